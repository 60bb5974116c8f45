"""Draft trees (sdlm/tree.py): several candidate continuations verified per speculative step.

1. The tree itself: building, validation, parsing ``--tree``, calibration's choice of nodes.
2. The step layout: a chain written as a tree gives exactly the chain step's logits; nodes of
   other branches are invisible.
3. Decoding with a tree on the tiny trained model: equal to ``transformers`` ``generate``, to the
   uncached reference and to batched decoding; more tokens per forward than the chain; the
   forward count equals the one-forward replay (SPEC §3.4) for D = 2, 4, 8. The same with a
   draft threshold, where each step offers only its likely nodes.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import hf_greedy, make_sdlm, random_prompt
from sdlm.batched import generate_batch
from sdlm.decode import Decoder, GenerationConfig, reference_decode
from sdlm.errors import SDLMError
from sdlm.layout import speculative_step
from sdlm.model import SDLM
from sdlm.tpf import tokens_per_forward
from sdlm.tree import DraftTree, TreeDrafts, calibrate, parse_tree, rank_path_counts, tree_accept, tree_visibility

# ---------------------------------------------------------------- 1. the tree


def test_product_and_chain_trees():
    t = DraftTree.product([3, 2, 1])
    assert len(t) == 3 + 6 + 6 and t.depth == 3 and t.widths == [3, 2, 1]
    assert t.paths[:4] == ((0,), (1,), (2,), (0, 0))
    assert t.parents[:5] == [-1, -1, -1, 0, 0]
    assert t.nodes_within(1) == 3 and t.nodes_within(2) == 9 and t.nodes_within(0) == 0
    c = DraftTree.chain(3)
    assert c.paths == ((0,), (0, 0), (0, 0, 0)) and c.parents == [-1, 0, 1] and c.is_chain
    assert not t.is_chain
    assert c.node_tokens([[7, 8], [9, 10], [11]]) == [7, 9, 11]
    assert t.node_tokens([[5, 6, 7], [8, 9], [1]])[:9] == [5, 6, 7, 8, 9, 8, 9, 8, 9]


@pytest.mark.parametrize("paths,msg", [
    ([[0], [0, 0], [0, 0]], "twice"),
    ([[0], [1, 0]], "parent"),
    ([[0], [-1]], "ranks"),
    ([[]], "ranks"),
    ([["a"]], "integers"),
    ([3], "integers"),
])
def test_bad_trees_are_refused(paths, msg):
    with pytest.raises(SDLMError, match=msg):
        DraftTree.from_paths(paths)


def test_tree_nodes_must_be_breadth_first():
    with pytest.raises(SDLMError, match="breadth-first"):
        DraftTree(((0,), (0, 0), (1,)))


def test_parse_tree(tmp_path):
    assert parse_tree(None, None, 4) is None and parse_tree("none", None, 4) is None
    assert parse_tree("2,2,1", None, 4).widths == [2, 2, 1]
    assert parse_tree("2,2,2,2", None, 4).depth == 3  # cut at D - 1
    f = tmp_path / "tree.json"
    f.write_text(json.dumps([[0], [1], [0, 0]]))
    assert parse_tree(str(f), None, 4).paths == ((0,), (1,), (0, 0))
    f.write_text(json.dumps({"block_size": 4, "paths": [[1], [0]]}))
    assert parse_tree(str(f), None, 4).paths == ((0,), (1,))
    assert parse_tree("auto", {"4": [[0], [0, 0], [1]]}, 4).paths == ((0,), (1,), (0, 0))
    with pytest.raises(SDLMError, match="no calibrated draft tree for block size 8"):
        parse_tree("auto", {"4": [[0]]}, 8)
    with pytest.raises(SDLMError, match="neither"):
        parse_tree("bogus", None, 4)
    with pytest.raises(SDLMError, match="block size >= 2"):
        parse_tree("2", None, 1)
    f.write_text("{not json")
    with pytest.raises(SDLMError, match="not valid JSON"):
        parse_tree(str(f), None, 4)


def test_best_tree_takes_the_most_frequent_paths():
    counts = Counter({(0,): 100, (1,): 30, (0, 0): 60, (0, 1): 20, (1, 0): 25, (0, 0, 0): 40, (2,): 5})
    assert DraftTree.best(counts, 3).paths == ((0,), (0, 0), (0, 0, 0))
    assert DraftTree.best(counts, 5).paths == ((0,), (1,), (0, 0), (1, 0), (0, 0, 0))
    assert DraftTree.best(counts, 5, max_depth=2).paths == ((0,), (1,), (0, 0), (0, 1), (1, 0))


def test_rank_path_counts():
    # prompt [1, 2], answer [3, 4, 5, 6]; blocks start at 1 .. 4 (rows), slots ranked (K = 2)
    seq = [1, 2, 3, 4, 5, 6]
    ranked = torch.zeros((4, 3, 2), dtype=torch.long)
    ranked[1, 1] = torch.tensor([4, 9])  # block at p = 2 (row 1): slot 1 predicts position 4, which holds 5
    # m = n_prompt = 2: the block at p = 1 (row 0) drafts; slot j predicts position 2 + j
    ranked[0, 1] = torch.tensor([9, 4])  # position 3 holds 4: rank 1
    ranked[0, 2] = torch.tensor([5, 9])  # position 4 holds 5: rank 0
    c = rank_path_counts(ranked, seq, 2)
    assert c[(1,)] == 1 and c[(1, 0)] == 1
    assert c[(0,)] == 0 and sum(c.values()) == 2  # row 1 offers 4 and 9 for position 4: no hit


def test_tree_accept_draws_lazily():
    parents, tokens = [-1, -1, 0, 1], [5, 6, 7, 8]
    asked = []
    want = {0: 6, 2: 8, 4: 3}
    assert tree_accept(parents, tokens, lambda i: asked.append(i) or want[i]) == [1, 3]
    assert asked == [0, 2, 4]  # only the nodes the walk reached, in order


def test_tree_accept():
    # root children 0 (token 5) and 1 (token 6); node 2 (token 7) under node 1; node 3 (token 8) under node 0
    parents, tokens = [-1, -1, 1, 0], [5, 6, 7, 8]
    assert tree_accept(parents, tokens, [6, 0, 7, 0, 0]) == [1, 2]
    assert tree_accept(parents, tokens, [5, 9, 0, 0, 0]) == [0]
    assert tree_accept(parents, tokens, [4, 0, 0, 0, 0]) == []
    with pytest.raises(ValueError):
        tree_accept(parents, tokens, [1, 2])


def test_likely_nodes_multiply_the_probabilities_along_each_rank_path():
    tree = DraftTree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    probs = [[0.6, 0.3], [0.5, 0.4], [0.9, 0.1]]  # slot j's ranked probabilities
    # joint: [0] .6, [1] .3, [0,0] .3, [0,1] .24, [1,0] .15, [0,0,0] .27
    assert tree.likely_nodes(probs, 0.0) == list(range(6))
    assert tree.likely_nodes(probs, 0.25) == [0, 1, 2, 5]
    assert tree.likely_nodes(probs, 0.28) == [0, 1, 2]
    assert tree.likely_nodes(probs, 0.3) == [0]  # strictly above: .3 is not
    assert tree.likely_nodes(probs, 0.6) == []
    kept = tree.likely_nodes(probs, 0.25)
    assert tree.parents_of(kept) == [-1, -1, 0, 2]  # [0,0,0] hangs under [0,0], the third node kept
    with pytest.raises(ValueError, match="closed under parents"):
        tree.parents_of([0, 1, 5])


def test_tree_drafts_keep_their_nodes_when_sliced():
    d = TreeDrafts([11, 12, 13], [0, 2, 5])
    assert d == [11, 12, 13] and d[1] == 12
    assert isinstance(d[:2], TreeDrafts) and d[:2].nodes == [0, 2] and d[:0].nodes == []
    with pytest.raises(ValueError, match="need 3 nodes"):
        TreeDrafts([1, 2, 3], [0])


def test_tree_visibility_hides_other_branches():
    parents, D, u = [-1, -1, 0], 2, 1
    vis = tree_visibility(parents, u, D)
    nodes = slice(1, 4)
    assert vis.shape == (1 + 3 + 4 * D,) * 2
    assert vis[nodes, nodes].tolist() == [[True, False, False], [False, True, False], [True, False, True]]
    root_block, block_of_2 = slice(4, 6), slice(4 + 3 * D, 4 + 4 * D)
    assert not vis[root_block, nodes].any()
    assert vis[block_of_2, nodes].tolist() == [[True, False, True]] * D


# ---------------------------------------------------------------- 2. the step


@pytest.mark.parametrize("D,k", [(2, 1), (4, 3), (4, 1)])
def test_a_chain_written_as_a_tree_is_the_chain_step(arch, D, k):
    sdlm = make_sdlm(arch, block_size=D)
    prompt = random_prompt(3, 9)
    drafts = random_prompt(4, k)
    mask_id = sdlm.config.mask_token_id
    chain = speculative_step(prompt, 0, drafts, D, mask_id)
    tree = speculative_step(prompt, 0, drafts, D, mask_id, parents=list(range(-1, k - 1)))
    assert torch.equal(chain.input_ids, tree.input_ids) and torch.equal(chain.info.pos, tree.info.pos)
    torch.testing.assert_close(sdlm.step_logits(tree), sdlm.step_logits(chain), rtol=1e-5, atol=1e-5)


def test_nodes_of_other_branches_are_invisible(arch):
    # node 1 (a sibling of node 0) and its block must not change when node 0's token changes
    sdlm = make_sdlm(arch)
    prompt, mask_id = random_prompt(5, 8), sdlm.config.mask_token_id
    parents = [-1, -1, 1]
    a = sdlm.step_logits(speculative_step(prompt, 0, [10, 20, 30], 4, mask_id, parents))
    b = sdlm.step_logits(speculative_step(prompt, 0, [11, 20, 30], 4, mask_id, parents))
    # logits: causal at root, nodes 0, 1, 2; then blocks root, 0, 1, 2 (D each)
    same = [0, 2, 3] + list(range(4, 8)) + list(range(12, 20))
    torch.testing.assert_close(a[same], b[same], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[1], b[1])  # node 0's own prediction did change


def test_a_tree_step_with_some_blocks_computes_what_the_whole_step_does(arch):
    # a block threshold leaves some candidate blocks out: the causal rows and the blocks carried must be
    # what the step with every block computes (blocks see no other block; nodes see no block)
    sdlm = make_sdlm(arch)
    prompt, mask_id, D = random_prompt(5, 8), sdlm.config.mask_token_id, 3
    parents = [-1, -1, 1, 0]
    full = sdlm.step_logits(speculative_step(prompt, 0, [10, 20, 30, 40], D, mask_id, parents))
    for blocks in ([0, 2], [3], [1, 4], []):
        step = speculative_step(prompt, 0, [10, 20, 30, 40], D, mask_id, parents, blocks=blocks)
        assert step.n_logits == 5 + len(blocks) * D and step.visible.shape == (len(step.input_ids),) * 2
        rows = list(range(5)) + [5 + b * D + j for b in blocks for j in range(D)]
        torch.testing.assert_close(sdlm.step_logits(step), full[rows], rtol=1e-5, atol=1e-5)


def test_tree_likely_ends():
    """The chance that the walk ends at each anchor: its joint probability less its offered children's."""
    tree = DraftTree.from_paths([(0,), (1,), (0, 0), (1, 0)])  # parents -1, -1, 0, 1
    joint = [0.6, 0.3, 0.5, 0.1]  # ends: root 0.1, node 0 0.1, node 1 0.2, node 2 0.5, node 3 0.1
    assert tree.likely_ends(range(4), joint, 0.0) == [0, 1, 2, 3, 4]
    assert tree.likely_ends(range(4), joint, 0.15) == [2, 3] and tree.likely_ends(range(4), joint, 0.6) == []
    assert tree.likely_ends([0, 2], [0.6, 0.5], 0.4) == [0, 2]  # root 0.4, node 0 0.1, node 2 (anchor 2) 0.5
    assert tree.likely_ends([0, 2], [0.6, 0.5], 0.45) == [2]
    assert tree.likely_ends([], [], 1.0) == [0]
    # the chain as a tree: the chain's rule
    from sdlm.decode import likely_accept_lengths

    chain, p = DraftTree.chain(3), [0.9, 0.5, 0.8]
    for thr in (0.0, 0.05, 0.3, 0.4, 0.5):
        assert chain.likely_ends(range(3), chain.joint_probs([[x] for x in p]), thr) == likely_accept_lengths(p, thr)


# ---------------------------------------------------------------- 3. decoding

PROMPTS = ["qwe qwe qwe", "abcd abcd ab", "zz zz zz zz", "hello hello", "mno", "x", "abab abab abab abab",
           "the cat sat on the mat the cat"]


def _ids(s):
    return [s.tokenizer(t)["input_ids"] for t in PROMPTS]


def _tpf(gens):
    return sum(g.new_tokens for g in gens) / sum(g.forwards for g in gens)


@pytest.mark.parametrize("D,tree", [(2, "3"), (4, "2,2,1"), (4, "3,3,3"), (8, "2,2,1,1,1,1,1")])
def test_tree_decoding_is_lossless_and_accepts_more(trained, monkeypatch, D, tree):
    prompts = _ids(trained)
    kept = []
    real_keep = SDLM.keep_tail
    monkeypatch.setattr(SDLM, "keep_tail", staticmethod(lambda c, s, idx: (kept.append(list(idx)), real_keep(c, s, idx))))
    cfg = GenerationConfig(block_size=D, max_new_tokens=30, tree=tree, draft_threshold=0.0, block_threshold=0.0)  # every node
    gens = [Decoder(trained, cfg).generate(p) for p in prompts]
    for p, g in zip(prompts, gens):
        assert g.tokens == hf_greedy(trained, p, 30)
    assert kept, "no step accepted a node other than the first ones: the KV gather went untested"
    chain = [Decoder(trained, GenerationConfig(block_size=D, max_new_tokens=30, draft_threshold=0.0,
                                               block_threshold=0.0)).generate(p)
             for p in prompts]
    assert sum(g.forwards for g in gens) < sum(g.forwards for g in chain)
    assert all(g.forwards <= c.forwards for g, c in zip(gens, chain))
    assert _tpf(gens) > _tpf(chain)


# every node, the CPU's default, a low one; with blocks only where the walk may well end, or after no drafts
@pytest.mark.parametrize("threshold,block_threshold", [(0.0, None), (None, None), (0.05, None), (0.05, 0.3), (0.1, 1.0)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_tree_cached_reference_and_batched_agree(trained, use_cache, threshold, block_threshold):
    prompts = _ids(trained)
    cfg = GenerationConfig(block_size=4, max_new_tokens=30, tree="3,2,1", use_cache=use_cache,
                           draft_threshold=threshold, block_threshold=block_threshold)
    alone = [Decoder(trained, cfg).generate(p) for p in prompts]
    if block_threshold:
        assert [g.tokens for g in alone] == [hf_greedy(trained, p, 30) for p in prompts]
        assert _tpf(alone) > 1.3  # nodes were still accepted
    for p, g in zip(prompts, alone):
        ref = reference_decode(trained, p, cfg)
        assert (g.tokens, g.forwards, g.accept_histogram) == (ref.tokens, ref.forwards, ref.accept_histogram)
    batched = generate_batch(Decoder(trained, cfg), prompts, batch_size=3)
    for b, a in zip(batched, alone):
        assert (b.tokens, b.forwards, b.accept_histogram, b.finish_reason) == (
            a.tokens, a.forwards, a.accept_histogram, a.finish_reason)


@pytest.mark.parametrize("threshold,block_threshold", [(0.0, 0.0), (0.05, 0.0), (0.2, 0.0), (0.0, 0.3), (0.1, 0.2),
                                                       (0.05, 1.0)])
@pytest.mark.parametrize("D,tree", [(2, "2"), (4, "3,2,1"), (8, "2,2,2,1,1,1,1")])
def test_tree_replay_counts_the_decoders_forwards(trained, monkeypatch, D, tree, threshold, block_threshold):
    cfg = GenerationConfig(block_size=D, max_new_tokens=24, tree=tree, draft_threshold=threshold,
                           block_threshold=block_threshold)
    dec = Decoder(trained, cfg)
    offered: list[int] = []
    carried: list[int] = []
    real_layout = Decoder._layout

    def layout(self, u, f, d, q=None):
        st = real_layout(self, u, f, d, q)
        offered.append(len(d))
        carried.append((st.n_logits - len(d) - 1) // D)
        return st

    monkeypatch.setattr(Decoder, "_layout", layout)
    for p in _ids(trained):
        offered.clear()
        carried.clear()
        g = dec.generate(p)
        r = tokens_per_forward(trained, p, g.tokens, D, max_new_tokens=24, tree=dec.tree, draft_threshold=threshold,
                               block_threshold=block_threshold)
        assert (r.forwards, r.new_tokens, r.accept_histogram) == (g.forwards, g.new_tokens, g.accept_histogram)
        assert r.offered == offered[1:]  # the nodes of every step after the prefill
        assert r.blocks == carried[1:]  # and the candidate blocks
        if not block_threshold:
            assert r.blocks == [k + 1 for k in r.offered]
        if threshold == 0.0 and not block_threshold:
            assert all(k == len(dec.tree) for k in r.offered[:-D])  # far from the length limit: every node


def test_tree_threshold_prunes_to_the_likely_nodes(trained):
    """A draft threshold offers fewer nodes per step than the whole tree, keeps the output (``generate``'s
    greedy tokens) and keeps most of the tree's accepted drafts; the CPU's default is its own."""
    from sdlm.decode import CPU_TREE_DRAFT_THRESHOLD

    prompts = _ids(trained)
    runs = {}
    for thr in (0.0, 0.2):
        cfg = GenerationConfig(block_size=4, max_new_tokens=30, tree="3,3,3", draft_threshold=thr)
        dec = Decoder(trained, cfg)
        gens = [dec.generate(p) for p in prompts]
        nodes = [tokens_per_forward(trained, p, g.tokens, 4, max_new_tokens=30, tree=dec.tree, draft_threshold=thr).offered
                 for p, g in zip(prompts, gens)]
        runs[thr] = (gens, sum(map(sum, nodes)) / sum(map(len, nodes)))
        for p, g in zip(prompts, gens):
            assert g.tokens == hf_greedy(trained, p, 30)
    (full, full_nodes), (pruned, pruned_nodes) = runs[0.0], runs[0.2]
    assert pruned_nodes < 0.5 * full_nodes  # 39 nodes offered per step without the threshold
    assert sum(g.forwards for g in pruned) <= 1.25 * sum(g.forwards for g in full)
    assert Decoder(trained, GenerationConfig(block_size=4, tree="3,3,3")).draft_threshold == CPU_TREE_DRAFT_THRESHOLD


def test_tree_at_the_length_limit(trained):
    # near the limit the tree is cut at depth remaining - 1: never a token past max_new_tokens
    for n in (1, 2, 3, 5):
        cfg = GenerationConfig(block_size=4, max_new_tokens=n, tree="3,3,3")
        for p in _ids(trained)[:3]:
            g = Decoder(trained, cfg).generate(p)
            assert g.tokens == hf_greedy(trained, p, n)


def test_auto_tree_from_calibration(trained, tmp_path):
    prompts = _ids(trained)
    samples = [(p, hf_greedy(trained, p, 30)) for p in prompts]
    tree, counts = calibrate(trained, samples, block_size=4, nodes=6, top_k=4)
    assert len(tree) == 6 and tree.depth <= 3 and counts[(0,)] >= counts[(0, 0)] > 0
    trained.config.draft_trees = {"4": tree.to_json()}
    try:
        dec = Decoder(trained, GenerationConfig(block_size=4, max_new_tokens=30, tree="auto"))
        assert dec.tree == tree
        for p, (_, y) in zip(prompts, samples):
            assert dec.generate(p).tokens == y
        with pytest.raises(SDLMError, match="no calibrated draft tree for block size 8"):
            Decoder(trained, GenerationConfig(block_size=8, tree="auto"))
    finally:
        trained.config.draft_trees = None


@pytest.mark.parametrize("sampling", [dict(temperature=0.8, seed=3), dict(temperature=1.2, top_k=5, top_p=0.9, seed=11),
                                      dict(temperature=0.8, seed=5, draft_threshold=0.1),
                                      dict(temperature=0.8, seed=7, draft_threshold=0.1, block_threshold=0.3)])
def test_sampled_tree_draws_what_ar_draws(trained, sampling):
    """Sampling over a tree draws the model's own token at each node the walk reaches, one draw per
    committed token as ``ar`` does: with the same seed, the same tokens as ``ar`` sampling (cached,
    uncached and batched), in fewer forwards, and a test that cannot pass by luck: other seeds differ."""
    prompts = _ids(trained)
    sampling = dict(sampling)
    threshold = sampling.pop("draft_threshold", 0.0)
    block_threshold = sampling.pop("block_threshold", 0.0)
    base = dict(max_new_tokens=30, **sampling)
    ar = [Decoder(trained, GenerationConfig(mode="ar", **base)).generate(p) for p in prompts]
    cfg = GenerationConfig(block_size=4, tree="3,2,1", draft_threshold=threshold, block_threshold=block_threshold, **base)
    tree = [Decoder(trained, cfg).generate(p) for p in prompts]
    assert [g.tokens for g in tree] == [g.tokens for g in ar]
    assert sum(g.forwards for g in tree) < 0.75 * sum(g.forwards for g in ar)
    for p, g in zip(prompts[:3], tree):
        ref = reference_decode(trained, p, cfg)
        assert (ref.tokens, ref.forwards) == (g.tokens, g.forwards)
    batched = generate_batch(Decoder(trained, cfg), prompts, batch_size=3)
    assert [(b.tokens, b.forwards) for b in batched] == [(g.tokens, g.forwards) for g in tree]
    other = [Decoder(trained, GenerationConfig(mode="ar", **{**base, "seed": base["seed"] + 1})).generate(p) for p in prompts]
    assert [g.tokens for g in other] != [g.tokens for g in ar]


@pytest.mark.parametrize("kw,msg", [
    (dict(mode="confidence", tree="2,2"), "mode speculative"),
    (dict(mode="ar", tree="2,2", temperature=0.7), "mode speculative"),
])
def test_tree_setting_errors(trained, kw, msg):
    with pytest.raises(SDLMError, match=msg):
        Decoder(trained, GenerationConfig(**kw))


def test_save_trees_keeps_other_sizes_and_refuses_non_model_folders(tmp_path):
    from sdlm.tree import save_trees

    with pytest.raises(SDLMError, match="not a model folder"):
        save_trees(tmp_path, {4: DraftTree.chain(3)})
    (tmp_path / "sdlm_adapter.json").write_text(json.dumps({"kind": "block-adapter", "sdlm": {"block_size": 4}}))
    save_trees(tmp_path, {8: DraftTree.chain(2)})
    save_trees(tmp_path, {4: DraftTree.product([2])})
    data = json.loads((tmp_path / "sdlm_adapter.json").read_text())
    assert data["kind"] == "block-adapter"
    assert data["sdlm"]["draft_trees"] == {"8": [[0], [0, 0]], "4": [[0], [1]]}
    (tmp_path / "sdlm_adapter.json").write_text(json.dumps({"kind": "block-adapter"}))
    with pytest.raises(SDLMError, match="no SDLM settings"):
        save_trees(tmp_path, {4: DraftTree.chain(3)})
