"""Benchmarks (not tests): what perfusion costs next to the work it cannot avoid.

    from perfusion_cli.bench import SpeedConfig, run_speed, write_reports
    result = run_speed(SpeedConfig(scale="toy"))
    md_path, json_path = write_reports(result, "docs/benchmarks")

Like the rest of the library, nothing here prints: progress goes to `progress(stage, done, total)`,
messages to `on_event(str)`.
"""

from .speed import (
    SCALES,
    SpeedConfig,
    SpeedResult,
    Timing,
    build_sd15,
    floor_step,
    machine_info,
    markdown,
    random_concepts,
    report_paths,
    run_speed,
    write_reports,
)

__all__ = [
    "SCALES",
    "SpeedConfig",
    "SpeedResult",
    "Timing",
    "build_sd15",
    "floor_step",
    "machine_info",
    "markdown",
    "random_concepts",
    "report_paths",
    "run_speed",
    "write_reports",
]
