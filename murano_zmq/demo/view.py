"""The demo's progress view: redrawn in place on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time

CLEAR_LINE = "\x1b[2K"


def _up(n: int) -> str:
    return f"\x1b[{n}A" if n else ""


class ProgressView:
    def __init__(self, envs: list, live: bool, out=None):
        self.envs = envs
        self.live = live
        self.out = out or sys.stdout
        self._notes: list[str] = []
        self._drawn = 0
        self._last = 0.0
        self._t0 = time.monotonic()

    def note(self, text: str) -> None:
        """An event worth a line (kept above the live table)."""
        line = text if text.startswith("[") else f"[{time.monotonic() - self._t0:6.2f}s] {text}"
        if self.live:
            self._notes.append(line)
        else:
            print(line, file=self.out, flush=True)

    def progress(self, event: dict) -> None:
        env = next((e for e in self.envs if e.name == event.get("env")), None)
        if env is None or env.done_at:
            return
        if event.get("step") == "done":
            env.units_done.add(event.get("unit"))
            env.step = f"{event.get('unit')} done"
        else:
            env.step = event.get("step", env.step)
        if not self.live and event.get("step") == "done":
            self.note(f"{env.name}: {event.get('unit')} done ({len(env.units_done)}/{len(env.units)}) "
                      f"by {event.get('conductor')}")

    def render(self, elapsed: float) -> None:
        if not self.live or time.monotonic() - self._last < 0.1:
            return
        self._last = time.monotonic()
        lines = self._notes[-8:]
        shown = self.envs[:30]
        for e in shown:
            done = len(e.units_done)
            bar = "#" * done + "-" * (len(e.units) - done)
            lines.append(f"  {e.name:<8} [{bar[:40]}] {done}/{len(e.units)}  {e.step}")
        if len(self.envs) > len(shown):
            finished = sum(1 for e in self.envs if e.done_at)
            lines.append(f"  ... {len(self.envs) - len(shown)} more; {finished}/{len(self.envs)} deployed")
        lines.append(f"  elapsed {elapsed:6.2f}s")
        text = _up(self._drawn) + "".join(f"{CLEAR_LINE}{line}\n" for line in lines)
        self.out.write(text)
        self.out.flush()
        self._drawn = len(lines)

    def finish(self) -> None:
        if self.live:
            self._last = 0.0
            self.render(time.monotonic() - self._t0)
