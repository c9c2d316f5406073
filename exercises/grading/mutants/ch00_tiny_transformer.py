"""Chapter 00's mutants (a tiny transformer from scratch): known-wrong solutions, each a patch of a reference
region. Every mutant must lose its exercise's points, and every patch must still apply to the library's region
(tests/test_exercises.py). The format is described in exercises/grading/mutants/__init__.py.
"""

from exercises.grading.mutants import Mutant

MUTANTS = [
    Mutant("0.1", "attention_fully_masked_row_uniform",
           "forgets to zero the rows that see no key: a fully masked query averages every value uniformly",
           old=("if allowed is None:\n"
                "    return torch.softmax(scores, dim=-1) @ v\n"
                "# the most negative finite number instead of -inf: a fully masked row stays finite (uniform), no NaN\n"
                "scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)\n"
                "weights = torch.softmax(scores, dim=-1)\n"
                "weights = weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # fully masked row -> zeros\n"
                "return weights @ v"),
           new=("if allowed is not None:\n"
                "    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)\n"
                "return torch.softmax(scores, dim=-1) @ v")),
    Mutant("0.1", "attention_mask_after_softmax",
           ("applies the mask after the softmax: masked keys still enter the normaliser, so the weights do "
            "not sum to 1"),
           old=("scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)\n"
                "if allowed is None:\n"
                "    return torch.softmax(scores, dim=-1) @ v\n"
                "# the most negative finite number instead of -inf: a fully masked row stays finite (uniform), no NaN\n"
                "scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)\n"
                "weights = torch.softmax(scores, dim=-1)\n"
                "weights = weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # fully masked row -> zeros"),
           new=("weights = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1)), dim=-1)\n"
                "if allowed is not None:\n"
                "    weights = weights.masked_fill(~allowed, 0.0)")),
    Mutant("0.1", "attention_mask_inverted",
           ("reads the mask the wrong way round: hides the keys marked True (= may attend) and keeps the "
            "others"),
           old=("scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)\n"
                "weights = torch.softmax(scores, dim=-1)\n"
                "weights = weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # fully masked row -> zeros"),
           new=("scores = scores.masked_fill(allowed, torch.finfo(scores.dtype).min)\n"
                "weights = torch.softmax(scores, dim=-1)\n"
                "weights = weights.masked_fill(allowed.all(dim=-1, keepdim=True), 0.0)")),
    Mutant("0.1", "attention_neg_inf_gives_nan",
           "masks with -inf: a fully masked row becomes softmax([-inf, ..., -inf]) = NaN instead of zeros",
           old=("if allowed is None:\n"
                "    return torch.softmax(scores, dim=-1) @ v\n"
                "# the most negative finite number instead of -inf: a fully masked row stays finite (uniform), no NaN\n"
                "scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)\n"
                "weights = torch.softmax(scores, dim=-1)\n"
                "weights = weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # fully masked row -> zeros\n"
                "return weights @ v"),
           new=("if allowed is not None:\n"
                "    scores = scores.masked_fill(~allowed, float(\"-inf\"))\n"
                "return torch.softmax(scores, dim=-1) @ v")),
    Mutant("0.1", "attention_no_scale",
           "forgets the 1/sqrt(d) scaling: the scores are q·k, so the softmax is too peaked for large heads",
           old="scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)",
           new="scores = q @ k.transpose(-2, -1)"),
    Mutant("0.1", "attention_scale_by_d",
           "divides the scores by d instead of sqrt(d)",
           old="scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)",
           new="scores = (q @ k.transpose(-2, -1)) / q.size(-1)"),
    Mutant("0.1", "attention_softmax_over_queries",
           "takes the softmax over the wrong axis (the queries, dim=-2) instead of the keys",
           old=("    return torch.softmax(scores, dim=-1) @ v\n"
                "# the most negative finite number instead of -inf: a fully masked row stays finite (uniform), no NaN\n"
                "scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)\n"
                "weights = torch.softmax(scores, dim=-1)"),
           new=("    return torch.softmax(scores, dim=-2) @ v\n"
                "scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)\n"
                "weights = torch.softmax(scores, dim=-2)")),
    Mutant("0.2", "causal_mask_float_not_bool",
           ("returns a 0/1 float tensor: `allowed` must be boolean (True = may attend), and ~mask fails on "
            "floats"),
           old=("query_pos = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)\n"
                "key_pos = torch.arange(n_keys, device=device)[None, :]\n"
                "return key_pos <= query_pos"),
           new="return torch.tril(torch.ones(n_queries, n_keys, device=device), diagonal=n_keys - n_queries)"),
    Mutant("0.2", "causal_mask_ignores_the_cache_offset",
           ("ignores the cache offset: with n_keys > n_queries query i sees only keys <= i, as if it were "
            "position i"),
           old=("query_pos = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)\n"
                "key_pos = torch.arange(n_keys, device=device)[None, :]\n"
                "return key_pos <= query_pos"),
           new="return torch.tril(torch.ones(n_queries, n_keys, dtype=torch.bool, device=device))"),
    Mutant("0.2", "causal_mask_offset_wrong_sign",
           ("shifts the queries the wrong way (i - (n_keys - n_queries)): with a cache they see too little of"
            " the past"),
           old="query_pos = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)",
           new="query_pos = torch.arange(n_queries, device=device)[:, None] - (n_keys - n_queries)"),
    Mutant("0.2", "causal_mask_sees_the_future",
           "compares the wrong way round: key_pos >= query_pos shows the future and hides the past",
           old="return key_pos <= query_pos",
           new="return key_pos >= query_pos"),
    Mutant("0.2", "causal_mask_strict_diagonal",
           "off by one on the diagonal: key_pos < query_pos hides each position from itself",
           old="return key_pos <= query_pos",
           new="return key_pos < query_pos"),
    Mutant("0.3", "merge_pair_does_not_skip_the_merged_token",
           ("after a merge, steps by 1 instead of 2: the second token of the pair is emitted again ([1, 2] ->"
            " [9, 2])"),
           old=("        i += 2\n"
                "    else:\n"
                "        out.append(ids[i])\n"
                "        i += 1"),
           new=("    else:\n"
                "        out.append(ids[i])\n"
                "    i += 1")),
    Mutant("0.3", "merge_pair_drops_the_last_token",
           ("loops while i < len(ids) - 1 to have a right neighbour, and so drops a last token that is not "
            "merged"),
           old=("while i < len(ids):\n"
                "    if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:"),
           new=("while i < len(ids) - 1:\n"
                "    if ids[i] == pair[0] and ids[i + 1] == pair[1]:")),
    Mutant("0.3", "merge_pair_mutates_the_input",
           ("merges in place (ids[i:i + 2] = [new_id]) and returns `ids`: right answer, but the caller's list"
            " changes"),
           old=("out, i = [], 0\n"
                "while i < len(ids):\n"
                "    if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:\n"
                "        out.append(new_id)\n"
                "        i += 2\n"
                "    else:\n"
                "        out.append(ids[i])\n"
                "        i += 1\n"
                "return out"),
           new=("i = 0\n"
                "while i < len(ids) - 1:\n"
                "    if ids[i] == pair[0] and ids[i + 1] == pair[1]:\n"
                "        ids[i:i + 2] = [new_id]\n"
                "    i += 1\n"
                "return ids")),
    Mutant("0.3", "merge_pair_scans_from_the_right",
           ("takes overlapping occurrences from the right: [1, 1, 1] with (1, 1) gives [1, 9] instead of [9, "
            "1]"),
           old=("out, i = [], 0\n"
                "while i < len(ids):\n"
                "    if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:\n"
                "        out.append(new_id)\n"
                "        i += 2\n"
                "    else:\n"
                "        out.append(ids[i])\n"
                "        i += 1\n"
                "return out"),
           new=("out, i = [], len(ids) - 1\n"
                "while i >= 0:\n"
                "    if i >= 1 and ids[i - 1] == pair[0] and ids[i] == pair[1]:\n"
                "        out.append(new_id)\n"
                "        i -= 2\n"
                "    else:\n"
                "        out.append(ids[i])\n"
                "        i -= 1\n"
                "return out[::-1]")),
    Mutant("0.4", "most_frequent_pair_least_frequent",
           "forgets to negate the count in the min() key: returns the least frequent pair",
           old="return min(counts, key=lambda pair: (-counts[pair], pair))",
           new="return min(counts, key=lambda pair: (counts[pair], pair))"),
    Mutant("0.4", "most_frequent_pair_pair_before_count",
           "orders the key the wrong way round, (pair, -count): returns the smallest pair whatever its count",
           old="return min(counts, key=lambda pair: (-counts[pair], pair))",
           new="return min(counts, key=lambda pair: (pair, -counts[pair]))"),
    Mutant("0.4", "most_frequent_pair_ties_by_insertion_order",
           ("max(counts, key=counts.get) ignores the tie rule: among equal counts it returns the first pair "
            "inserted"),
           old="return min(counts, key=lambda pair: (-counts[pair], pair))",
           new="return max(counts, key=counts.get)"),
    Mutant("0.4", "most_frequent_pair_ties_to_the_largest_pair",
           "breaks ties the wrong way: max over (count, pair) returns the largest of the tied pairs",
           old="return min(counts, key=lambda pair: (-counts[pair], pair))",
           new="return max(counts, key=lambda pair: (counts[pair], pair))"),
    Mutant("0.5", "sample_next_token_argmax_instead_of_sampling",
           ("takes the argmax of the filtered distribution instead of drawing from it: greedy at every "
            "temperature"),
           old=("probs = torch.softmax(logits, dim=-1)\n"
                "return torch.multinomial(probs, num_samples=1, generator=generator)"),
           new="return torch.softmax(logits, dim=-1).argmax(dim=-1, keepdim=True)"),
    Mutant("0.5", "sample_next_token_ignores_the_generator",
           ("ignores the generator: draws from the global random state, so a seeded generator does not "
            "reproduce"),
           old="return torch.multinomial(probs, num_samples=1, generator=generator)",
           new="return torch.multinomial(probs, num_samples=1)"),
    Mutant("0.5", "sample_next_token_no_greedy_case",
           "forgets the greedy case: divides by temperature 0, and the softmax of +-inf logits is NaN",
           old=("if temperature == 0:\n"
                "    return logits.argmax(dim=-1, keepdim=True)"),
           new=""),
    Mutant("0.5", "sample_next_token_samples_from_the_logits",
           ("samples from the logits, not the probabilities: torch.multinomial needs softmax(logits), not raw"
            " scores"),
           old=("    logits = logits.masked_fill(logits < kth, float(\"-inf\"))\n"
                "probs = torch.softmax(logits, dim=-1)\n"
                "return torch.multinomial(probs, num_samples=1, generator=generator)"),
           new=("    logits = logits.masked_fill(logits < kth, 0.0)\n"
                "return torch.multinomial(logits, num_samples=1, generator=generator)")),
    Mutant("0.5", "sample_next_token_temperature_after_softmax",
           "divides the probabilities by T after the softmax: multinomial renormalises, so T has no effect",
           old=("logits = logits / temperature\n"
                "if top_k is not None:\n"
                "    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]\n"
                "    logits = logits.masked_fill(logits < kth, float(\"-inf\"))\n"
                "probs = torch.softmax(logits, dim=-1)"),
           new=("if top_k is not None:\n"
                "    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]\n"
                "    logits = logits.masked_fill(logits < kth, float(\"-inf\"))\n"
                "probs = torch.softmax(logits, dim=-1) / temperature")),
    Mutant("0.5", "sample_next_token_temperature_multiplies",
           "multiplies the logits by T instead of dividing: a high temperature sharpens instead of flattening",
           old="logits = logits / temperature",
           new="logits = logits * temperature"),
    Mutant("0.5", "sample_next_token_top_k_drops_ties",
           "keeps exactly k tokens by torch.topk indices: a token tied with the k-th largest logit is dropped",
           old=("    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]\n"
                "    logits = logits.masked_fill(logits < kth, float(\"-inf\"))"),
           new=("    top = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)\n"
                "    logits = torch.full_like(logits, float(\"-inf\")).scatter(-1, top.indices, top.values)")),
    Mutant("0.5", "sample_next_token_top_k_keeps_k_plus_one",
           "off by one in top-k: takes the (k+1)-th largest logit as the threshold, so k + 1 tokens stay",
           old="    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]",
           new="    kth = torch.topk(logits, min(top_k + 1, logits.size(-1)), dim=-1).values[:, -1:]"),

    # -- mutants that the grader of issue 10 passed: one per class of miss, each caught by a new check or guard
    Mutant("0.1", "attention_fill_minus_1e4",
           "hides masked keys with -1e4 instead of the dtype's minimum: once visible scores fall below -1e4 a "
           "masked key wins",
           old="scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)",
           new="scores = scores.masked_fill(~allowed, -1e4)"),
    Mutant("0.1", "attention_fill_minus_1e9",
           "hides masked keys with -1e9, which float16 cannot hold: masked_fill raises on half-precision input",
           old="scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)",
           new="scores = scores.masked_fill(~allowed, -1e9)"),
    Mutant("0.1", "attention_unshifted_softmax",
           "writes the softmax as exp / sum without subtracting the row maximum: large scores overflow to NaN",
           old=("weights = torch.softmax(scores, dim=-1)\n"),
           new=("weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)\n")),
    Mutant("0.1", "attention_unshifted_softmax_nan_replaced",
           "writes the softmax as exp / sum without the max shift and replaces the NaN of an overflow by 0: finite, "
           "but a row whose scores overflow gets no weight at all",
           old=("weights = torch.softmax(scores, dim=-1)\n"),
           new=("weights = torch.nan_to_num(scores.exp() / scores.exp().sum(dim=-1, keepdim=True))\n")),
    Mutant("0.1", "attention_scales_q_in_place",
           "divides q by sqrt(d) in place: the caller's queries (or a KV cache) are changed",
           old="scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)",
           new="scores = q.div_(math.sqrt(q.size(-1))) @ k.transpose(-2, -1)"),
    Mutant("0.1", "attention_computes_in_float64",
           "computes in float64 whatever the input dtype: a float32 model gets float64 activations",
           old="return weights @ v",
           new="return weights.double() @ v.double()"),
    Mutant("0.2", "causal_mask_ignores_the_device",
           "builds the mask on the CPU whatever `device` says: a GPU model gets a CPU mask",
           old=("query_pos = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)\n"
                "key_pos = torch.arange(n_keys, device=device)[None, :]"),
           new=("query_pos = torch.arange(n_queries)[:, None] + (n_keys - n_queries)\n"
                "key_pos = torch.arange(n_keys)[None, :]")),
    Mutant("0.2", "causal_mask_memoized",
           "caches the mask it returns: a caller that edits its mask corrupts every later call",
           old="return key_pos <= query_pos",
           new=("cache = causal_mask.__dict__.setdefault(\"cache\", {})\n"
                "key = (n_queries, n_keys, str(device))\n"
                "if key not in cache:\n"
                "    cache[key] = key_pos <= query_pos\n"
                "return cache[key]")),
    Mutant("0.2", "causal_mask_fixed_buffer",
           "slices a fixed 16 x 16 lower triangle: wrong past 16 positions",
           old=("query_pos = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)\n"
                "key_pos = torch.arange(n_keys, device=device)[None, :]\n"
                "return key_pos <= query_pos"),
           new=("buffer = torch.ones(16, 16, dtype=torch.bool, device=device).tril()\n"
                "return buffer[n_keys - n_queries:n_keys, :n_keys].clone()")),
    Mutant("0.3", "merge_pair_string_replace",
           "merges by str.replace on the ids joined with spaces: '1 12' contains '1 1', so multi-digit ids merge "
           "wrongly",
           old=("out, i = [], 0\n"
                "while i < len(ids):\n"
                "    if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:\n"
                "        out.append(new_id)\n"
                "        i += 2\n"
                "    else:\n"
                "        out.append(ids[i])\n"
                "        i += 1\n"
                "return out"),
           new=("text = \" \".join(map(str, ids)).replace(f\"{pair[0]} {pair[1]}\", str(new_id))\n"
                "return [int(t) for t in text.split()]")),
    Mutant("0.3", "merge_pair_returns_its_input_when_absent",
           "returns the input list itself when the pair does not occur: the docstring promises a new list",
           old="out, i = [], 0",
           new=("if not any((a, b) == tuple(pair) for a, b in zip(ids, ids[1:])):\n"
                "    return ids\n"
                "out, i = [], 0")),
    Mutant("0.3", "merge_pair_list_equal_to_everything",
           "returns a list subclass whose == is always True: a loose comparison would accept any answer",
           old="out, i = [], 0",
           new=("class Tokens(list):\n"
                "    def __eq__(self, other):\n"
                "        return True\n"
                "\n"
                "    def __ne__(self, other):\n"
                "        return False\n"
                "\n"
                "out, i = Tokens([pair[0]] if ids else []), 0")),
    Mutant("0.4", "most_frequent_pair_ties_by_string",
           "breaks ties by the pair's string: '(10, 1)' < '(9, 5)', so two-digit ids tie the wrong way",
           old="return min(counts, key=lambda pair: (-counts[pair], pair))",
           new="return min(counts, key=lambda pair: (-counts[pair], str(pair)))"),
    Mutant("0.4", "most_frequent_pair_ties_by_first_element",
           "breaks ties by the first element only: (2, 9) and (2, 7) tie, and the dict's order decides",
           old="return min(counts, key=lambda pair: (-counts[pair], pair))",
           new="return min(counts, key=lambda pair: (-counts[pair], pair[0]))"),
    Mutant("0.5", "sample_next_token_divides_the_logits_in_place",
           "divides the caller's logits by T in place: the logits the caller keeps are changed",
           old="logits = logits / temperature",
           new="logits /= temperature"),
    Mutant("0.5", "sample_next_token_threshold_from_the_first_row",
           "takes the k-th largest logit of the first row for every row of the batch",
           old="kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]",
           new="kth = torch.topk(logits[0], min(top_k, logits.size(-1))).values[-1]"),
    Mutant("0.5", "sample_next_token_top_k_above_the_vocabulary_fails",
           "calls torch.topk with top_k itself: a top_k larger than the vocabulary raises",
           old="kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]",
           new="kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]"),
    Mutant("0.5", "sample_next_token_generator_dropped_with_top_k",
           "forgets the generator on the top-k path: with top_k the draws come from the global RNG",
           old=("probs = torch.softmax(logits, dim=-1)\n"
                "return torch.multinomial(probs, num_samples=1, generator=generator)"),
           new=("probs = torch.softmax(logits, dim=-1)\n"
                "if top_k is not None:\n"
                "    return torch.multinomial(probs, num_samples=1)\n"
                "return torch.multinomial(probs, num_samples=1, generator=generator)")),
    Mutant("0.5", "sample_next_token_unshifted_softmax",
           "normalizes exp(logits / T) without subtracting the maximum: logits of 1000 overflow to NaN",
           old="probs = torch.softmax(logits, dim=-1)",
           new="probs = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)"),
    Mutant("0.1", "attention_softmax_over_heads",
           "normalizes over dim=1, the heads, instead of the keys: heads mix, and a single head looks right",
           old=("    return torch.softmax(scores, dim=-1) @ v\n"
                "# the most negative finite number instead of -inf: a fully masked row stays finite (uniform), no NaN\n"
                "scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)\n"
                "weights = torch.softmax(scores, dim=-1)"),
           new=("    return torch.softmax(scores, dim=1) @ v\n"
                "scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)\n"
                "weights = torch.softmax(scores, dim=1)")),

    # -- 0.6 BPE training, the merge loop
    Mutant("0.6", "train_bpe_counts_each_chunk_once",
           "counts every distinct chunk once, ignoring how often it occurs in the text",
           old="freqs = list(chunks.values())  # ...with its multiplicity",
           new="freqs = [1] * len(chunks)"),
    Mutant("0.6", "train_bpe_merges_across_chunks",
           "skips the regex split: the whole text is one chunk, so pairs and merges cross word boundaries",
           old="chunks = Counter(regex.findall(pattern, text))",
           new="chunks = Counter([text]) if text else Counter()"),
    Mutant("0.6", "train_bpe_ignores_the_pattern",
           "always splits with GPT2_PATTERN, whatever `pattern` says",
           old="chunks = Counter(regex.findall(pattern, text))",
           new="chunks = Counter(regex.findall(GPT2_PATTERN, text))"),
    Mutant("0.6", "train_bpe_merges_pairs_seen_once",
           "keeps merging pairs that occur only once (stops at count 0 instead of below 2)",
           old="if counts[pair] < 2:",
           new="if counts[pair] < 1:"),
    Mutant("0.6", "train_bpe_never_removes_merged_pairs",
           ("adds the new pairs after a merge but never subtracts the old ones: the counts go stale and later "
            "merges are chosen from wrong counts"),
           old=("        for p in zip(old, old[1:]):\n"
                "            counts[p] -= freqs[i]\n"),
           new=""),
    Mutant("0.6", "train_bpe_one_merge_too_many",
           "learns vocab_size - 255 merges: the vocabulary ends one token over vocab_size",
           old="while 256 + len(merges) < vocab_size and counts:",
           new="while 256 + len(merges) <= vocab_size and counts:"),
    Mutant("0.6", "train_bpe_ties_by_insertion_order",
           "picks the pair with max(counts, key=counts.get): ties go to the first pair counted, not the smallest",
           old="pair = most_frequent_pair(counts)",
           new="pair = max(counts, key=counts.get)"),
]
