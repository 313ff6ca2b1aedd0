"""The run's one markdown table, ready for the README: a row per measurement, every part's status."""
from __future__ import annotations

import importlib

COLUMNS = ("part", "status", "measurement", "accel", "baseline", "accel vs baseline")


def seconds_text(seconds: float) -> str:
    """``1.52 s``, ``12.3 ms``, ``41.0 us``."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def speed_text(ratio: float) -> str:
    """A baseline-over-ours time ratio as words: ``2.10x faster`` / ``1.35x slower``."""
    if ratio <= 0:
        return "n/a"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _escape(cell) -> str:
    return str(cell).replace("|", "\\|").replace("\n", " ")


def _part_rows(outcome) -> list[tuple]:
    """``table_rows(record)`` of the part's module: ``(measurement, accel, baseline, ratio)`` tuples."""
    try:
        from accel.gpucheck import PARTS

        module = importlib.import_module(PARTS[outcome.part].target.partition(":")[0])
        return list(module.table_rows(outcome.record))
    except Exception as error:  # noqa: BLE001 - a table must come out whatever a record holds
        return [("(could not summarise the record)", f"{type(error).__name__}: {error}", "", "")]


def markdown_table(environment: dict, outcomes, self_check, elapsed_s: float, not_started=()) -> str:
    if environment["dry_run"]:
        title = ("**DRY RUN: no GPU was measured.** CPU stand-ins of every part; the figures only show "
                 "that the harness works.")
    else:
        title = (f"**{environment['gpu_name']}**, driver {environment['driver']}, CUDA {environment['cuda']}, "
                 f"torch {environment['torch']}, {environment['date_utc']} UTC")
    lines = [title, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    if self_check is not None:
        passed, text = self_check
        lines.append(f"| runner self-check | {'ok' if passed else 'FAILED'} | {_escape(text)} |  |  |  |")
    for outcome in outcomes:
        rows = _part_rows(outcome)
        status = outcome.status if outcome.status == "ok" else outcome.status.upper()
        if outcome.status != "ok":
            rows.insert(0, (f"{outcome.status} after {outcome.elapsed_s:.0f} s: {outcome.record.get('error')}",
                            "", "", ""))
        if not rows:
            rows = [("(nothing measured)", "", "", "")]
        for measurement, accel, baseline, ratio in rows:
            lines.append(f"| {outcome.part} | {status} | {_escape(measurement)} | {_escape(accel)} | "
                         f"{_escape(baseline)} | {_escape(ratio)} |")
    for name in not_started:
        lines.append(f"| {name} | NOT RUN | the run's total budget was spent or it was interrupted |  |  |  |")
    lines += ["", f"Whole run: {elapsed_s:.0f} s."]
    return "\n".join(lines) + "\n"
