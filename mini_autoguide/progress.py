"""One progress bar for every long loop: a tqdm bar, or a bar that does nothing where progress is off.

    bar = progress_bar(total, "train", "step", enabled=verbose)
    for ...:
        bar.update(1)
    bar.close()

tqdm is imported only when a bar is shown, so quiet runs and tests never touch it.
"""


class _Silent:
    """tqdm's methods that the loops call, doing nothing."""

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(total, desc, unit, enabled=True, initial=0, leave=False):
    """A tqdm bar over `total` units starting at `initial`, or a silent one when not enabled.
    leave=True keeps the finished bar on screen (the top-level loops: train, sweep, prep)."""
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm   # 0.13 s to import: only when a bar is shown
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
