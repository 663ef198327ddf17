"""Progress of a (sliding-window) generation: one bar or callback over the LM steps of all windows."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from .config import Window

Progress = bool | Callable[[int, int], None]
WindowProgress = tuple[Callable[[int, Window], Callable[[int, int], None]], Callable[[], None]]


def window_progress(windows: Callable[[], Iterator[Window]], steps: Callable[[Window], int],
                    progress: Progress) -> WindowProgress:
    """``callback_for(index, window)``: the LM callback of each window in turn, counting steps
    over all windows; and a closer for the bar. ``progress`` True shows a tqdm bar, a callable is
    called as ``progress(step, total)``. The plan is walked once for the total, lazily."""
    if not progress:
        return (lambda index, window: None), (lambda: None)
    count = grand_total = 0
    for window in windows():
        count, grand_total = count + 1, grand_total + steps(window)
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=grand_total, unit="step", desc="generating", leave=False)
        emit, close = (lambda done: bar.update(done - bar.n)), bar.close
        label = bar.set_description_str
    elif callable(progress):
        emit, close, label = (lambda done: progress(done, grand_total)), (lambda: None), (lambda text: None)
    else:
        raise TypeError(f"progress must be a bool or a callable(step, total), "
                        f"found {type(progress).__name__}")
    done_before = [0]

    def callback_for(index: int, window: Window) -> Callable[[int, int], None]:
        base = done_before[0]
        done_before[0] += steps(window)
        if count > 1:
            label(f"generating, window {index + 1}/{count}")
        return lambda step, total: emit(base + step)

    return callback_for, close


__all__ = ["Progress", "WindowProgress", "window_progress"]
