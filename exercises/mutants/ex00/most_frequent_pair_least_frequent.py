# Forgets to negate the count in the min() key: returns the least frequent pair.
def most_frequent_pair(counts: dict[tuple[int, int], int]) -> tuple[int, int]:
    return min(counts, key=lambda pair: (counts[pair], pair))
