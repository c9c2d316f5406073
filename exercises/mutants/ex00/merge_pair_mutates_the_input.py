# Merges in place (ids[i:i + 2] = [new_id]) and returns `ids`: right answer, but the caller's list changes.
def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    i = 0
    while i < len(ids) - 1:
        if ids[i] == pair[0] and ids[i + 1] == pair[1]:
            ids[i:i + 2] = [new_id]
        i += 1
    return ids
