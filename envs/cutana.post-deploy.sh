#!/usr/bin/env bash
# Run by Snakemake inside the new conda environment of envs/cutana.yaml (--sdm conda): make the
# cutana package importable there. Its dependencies come from cutana.yaml; the package itself is
# copied (pure Python) from wherever this workflow lives, so no network access is needed.
set -euo pipefail

workflow_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -d "$workflow_root/src/cutana" ]; then
    # a repository checkout: <root>/envs/this-script, <root>/src/cutana
    package_dir="$workflow_root/src/cutana"
else
    # the copy shipped inside an installed cutana: <site-packages>/cutana/_workflow/envs/...
    package_dir="$(dirname "$workflow_root")"
fi
site_packages="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$site_packages/cutana"
cp -R "$package_dir" "$site_packages/cutana"
python -c 'import cutana; print("cutana", cutana.__version__, "installed in", cutana.__file__)'
