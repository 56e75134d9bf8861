"""Seed lists as text: "0-63" or "1,5,10-12" on the command line, and back again in result files."""


def parse_seeds(text):
    """"0-63" -> [0..63]; "1,5,10-12" -> [1, 5, 10, 11, 12]."""
    seeds = []
    for part in str(text).split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            lo, hi = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"bad seed range {part.strip()!r}: use forms like 0-63 or 1,5,10-12") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"bad seed range {part.strip()!r}: need 0 <= first <= last")
        seeds.extend(range(lo, hi + 1))
    return seeds


def seed_text(seeds):
    """[0, 1, 2, 5] -> "0-2,5": the inverse of parse_seeds, recorded with every result."""
    seeds, parts, i = [int(s) for s in seeds], [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)
