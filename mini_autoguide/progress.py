"""One progress bar for every long loop: a tqdm bar, or None where progress is off.

    bar = progress_bar(total, "train", "step", enabled=verbose)
    ...
    if bar is not None:
        bar.update(1)

tqdm is imported only when a bar is shown, so quiet runs and tests never touch it.
"""


def progress_bar(total, desc, unit, enabled=True, initial=0, leave=False):
    """A tqdm bar over `total` units starting at `initial`, or None when not enabled.
    leave=True keeps the finished bar on screen (the top-level loops: train, sweep, prep)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
