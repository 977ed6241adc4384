"""Run upstream Cutana (installed in its own virtual environment) on a catalogue and print JSON.

Executed by ``bench_pipeline.py --with-upstream`` with the upstream venv's Python; it is not
imported by cutana. Usage: ``python upstream_runner.py CATALOGUE OUTDIR RES BANDS...`` where
BANDS are upstream band names (VIS, NIR-Y, NIR-H) in file order.
"""

import json
import sys
import time

from cutana import Orchestrator, get_default_config


def main(argv):
    catalogue, output_dir, resolution, *bands = argv
    n_channels = len(bands)
    config = get_default_config()
    config.source_catalogue = catalogue
    config.output_dir = output_dir
    config.output_format = "zarr"
    config.data_type = "float32"
    config.target_resolution = int(resolution)
    config.normalisation_method = "asinh"
    config.max_workers = 2
    config.N_batch_cutout_process = 1000
    config.apply_flux_conversion = True
    config.selected_extensions = [{"name": b, "ext": "PRIMARY"} for b in bands]
    config.channel_weights = {
        b: [1.0 if c == i else 0.0 for c in range(n_channels)] for i, b in enumerate(bands)
    }
    config.console_log_level = "WARNING"
    start = time.perf_counter()
    result = Orchestrator(config).run()
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            {
                "elapsed_s": elapsed,
                "status": result.get("status"),
                "total_sources": result.get("total_sources"),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
