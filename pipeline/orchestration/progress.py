"""One progress bar per stage while a pipeline runs (the driver's view: started, steps logged, finished).

Drawn with tqdm on stderr, only when stderr is a terminal (``enabled=None``), so logs, tests and pipes
see nothing. A bar shows the stage, its state (``running``, ``resumed``, the last step it reported
through ``log_metrics``, then ``ran`` / ``skipped`` / ``failed`` / ``not run``) and the time since it started.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StageProgress"]

_FORMAT = "{desc}  [{elapsed}]"


class StageProgress:
    """The stage bars of one pipeline run.

    Args:
        stages: the stage names, in DAG order (sets the width of the names).
        enabled: draw bars; None (default): when stderr is a terminal.
    """

    def __init__(self, stages: list[str], enabled: bool | None = None) -> None:
        self.width = max((len(s) for s in stages), default=0)
        self.disable = None if enabled is None else not enabled
        self.bars: dict[str, Any] = {}

    def _bar(self, stage: str) -> Any:
        bar = self.bars.get(stage)
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=None, desc=stage.ljust(self.width), bar_format=_FORMAT,
                       leave=True, disable=self.disable)
            self.bars[stage] = bar
        return bar

    def _show(self, stage: str, state: str, refresh: bool = True) -> None:
        # one width for every state: a line never keeps the tail of a longer one
        self._bar(stage).set_description_str(f"{stage.ljust(self.width)}  {state:<10}", refresh=refresh)

    def started(self, stage: str, resumed: bool = False) -> None:
        """A stage began (or resumed an interrupted attempt)."""
        self._show(stage, "resumed" if resumed else "running")

    def step(self, stage: str, step: int) -> None:
        """A stage reported metrics for ``step`` (an epoch of a training stage)."""
        self._show(stage, f"step {step}", refresh=False)
        self._bar(stage).update(1)

    def finished(self, stage: str, status: str) -> None:
        """A stage ended with ``status`` (its bar stays, showing it)."""
        self._show(stage, status)
        self._bar(stage).close()

    def close(self) -> None:
        """Close every bar still open (an interrupted run)."""
        for bar in self.bars.values():
            bar.close()
