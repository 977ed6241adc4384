# cutana: cut normalised image stamps out of large FITS survey mosaics.
#
# Entry point of the workflow (SPEC §1-§3): configuration, validation, includes and the final
# targets. Every stage lives in its own file under workflow/rules/; common.smk holds the helpers.
#
#   snakemake --cores 2                          # the built-in demo survey (config/config.yaml)
#   snakemake --cores 2 --configfile my.yaml     # your survey; missing keys take their defaults
#   snakemake --snakefile <pkg>/cutana/_workflow/Snakefile --directory DIR --configfile my.yaml


from snakemake.utils import min_version, validate

min_version("9.0")


# The demo configuration is the default only when no --configfile is given: Snakemake merges
# nested mappings, so loading it under a user's config would mix the demo's channel_weights
# bands into the user's. Missing keys are filled from the schema defaults instead.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"


# Two validators of the one schema: cutana's first (it also checks the cross-key rules, and its
# messages name the key, the bad value and the allowed range), then Snakemake's on the completed
# config. The workflow and the Python API thus accept exactly the same configurations.
coerce_cli_strings(config, load_config_schema())
config.update(validated_config(config))
validate(config, "workflow/schemas/config.schema.yaml", set_default=True)
export_run_config(config)

PATHS = workflow_paths(config)
JOB = job_command()
WARM_JOB = job_command(warm=True)
# The pixel-relevant settings, for the commands of the rules whose outputs they change.
PIXEL_SETTINGS = settings_option(config_hash(config))


include: "workflow/rules/demo.smk"
include: "workflow/rules/catalogue.smk"
include: "workflow/rules/memory.smk"
include: "workflow/rules/cutout.smk"
include: "workflow/rules/report.smk"


localrules:
    all,


# The batch outputs are targets too: Snakemake does not remake a deleted intermediate file when
# the files after it are up to date, but it does remake a missing target.
rule all:
    default_target: True
    input:
        all_batch_dirs,
        all_status_files,
        PATHS.index,
        PATHS.summary,
        PATHS.config_toml,
        PATHS.gallery_png,
        PATHS.gallery_html,


# A warm process that imports the jobs' modules while the catalogue is split (local runs).
onstart:
    start_warm_server()


# Once every job has ended: the rows per status (a warning when some failed), then no waiting
# for the scheduler's idle timers or the interpreter's final garbage collection (~1 s per run,
# cutana/snakemake_exit.py).
onsuccess:
    report_finished_run()
    finish_promptly()


onerror:
    finish_promptly()
