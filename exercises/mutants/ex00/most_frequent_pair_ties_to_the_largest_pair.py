# Breaks ties the wrong way: max over (count, pair) returns the largest of the tied pairs.
def most_frequent_pair(counts: dict[tuple[int, int], int]) -> tuple[int, int]:
    return max(counts, key=lambda pair: (counts[pair], pair))
