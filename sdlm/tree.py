"""Draft trees: verify several candidate continuations in one speculative step (greedy, lossless).

In SPEC §3.2 a step verifies one chain of drafts ``d_0 .. d_{k-1}``: the top-1
predictions of mask slots 1..D-1 of the block that follows the last accepted
token. A draft tree also offers the runners-up. Every node is a *rank path*
``(r_1, .., r_j)``: the node at depth ``j`` holds the ``r_j``-th most likely
token of slot ``j``, and its parent is ``(r_1, .., r_{j-1})``. The chain of
depth ``k`` is the tree ``(0,), (0, 0), .., (0,) * k``.

One forward then holds, after the uncached committed tokens:

- the nodes as causal tokens, node ``i`` at position ``n - 1 + depth_i``; it sees
  the committed prefix, its ancestors and itself, no other node;
- one candidate block per node and one for the root (the last committed token);
  the block of node ``i`` starts at the node's position and sees the committed
  prefix and the node's ancestors (the node itself through its own slot 0).

The causal logit at the root and at every node is the model's own greedy next
token there, so walking down the tree while a child holds that token accepts
exactly the drafts AR decoding would have written; the bonus token is the
causal prediction at the deepest accepted node, and the next step's drafts are
taken from that node's block. The output stays token-identical to AR greedy,
while a step accepts more: the runner-up of a slot is often right when the top
prediction is not.

A step processes ``|uncached| + N + (N + 1) * D`` tokens for a tree of ``N``
nodes (the chain: ``N = D - 1``). That is cheap on a GPU, where a small
model's forward costs about the same for 20 or 100 tokens, and costly on a CPU.

Nodes are kept in breadth-first order (by depth), so cutting a tree at a depth,
as near the length limit, keeps a prefix of its nodes.

With a draft threshold ``P`` (:attr:`sdlm.decode.GenerationConfig.draft_threshold`)
a step offers only the nodes whose joint probability, the product of the block
probabilities along their rank path, is above ``P`` (:meth:`DraftTree.likely_nodes`):
the tree takes the shape of the block's confidence, wide where the runners-up are
likely and a short chain or nothing where even the top predictions are not. A
node is never likelier than its parent, so the offered nodes are a tree too
(:class:`TreeDrafts` carries which ones). Pruning reads only the block's
probabilities, never the model's own tokens, so the output is unchanged.

With a block threshold (:attr:`sdlm.decode.GenerationConfig.block_threshold`) a step carries the
candidate block of a node (or of the root) only where the walk is likely to end there
(:meth:`DraftTree.likely_ends`); the next step offers no nodes where it ended elsewhere.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .errors import SDLMError

Path_ = tuple[int, ...]


@dataclass(frozen=True)
class DraftTree:
    """A tree of rank paths in breadth-first order (see the module docstring)."""

    paths: tuple[Path_, ...]

    def __post_init__(self) -> None:
        seen: set[Path_] = set()
        last_depth = 1
        for p in self.paths:
            if not p or any((not isinstance(r, int)) or r < 0 for r in p):
                raise SDLMError(f"draft tree node {list(p)} is not a list of ranks >= 0 (e.g. [0, 1])")
            if p in seen:
                raise SDLMError(f"draft tree node {list(p)} appears twice")
            if len(p) > 1 and p[:-1] not in seen:
                raise SDLMError(f"draft tree node {list(p)} comes before (or without) its parent {list(p[:-1])}")
            if len(p) < last_depth:
                raise SDLMError("draft tree nodes must be in breadth-first order (by depth): "
                                f"{list(p)} comes after a deeper node")
            last_depth = len(p)
            seen.add(p)

    # ------------------------------------------------------------ building

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]]) -> "DraftTree":
        """Any closed set of rank paths (every prefix of a node is a node), in any order."""
        try:
            ps = [tuple(int(r) for r in p) for p in paths]
        except (TypeError, ValueError):
            raise SDLMError("a draft tree is a list of rank paths, each a list of integers: [[0], [1], [0, 0]]") from None
        uniq = sorted(set(ps), key=lambda p: (len(p), p))
        if len(uniq) != len(ps):
            raise SDLMError("a draft tree node appears twice")
        return cls(tuple(uniq))

    @classmethod
    def chain(cls, depth: int) -> "DraftTree":
        """The plain speculative chain: the top-1 prediction of slots 1..depth."""
        return cls(tuple((0,) * j for j in range(1, depth + 1)))

    @classmethod
    def product(cls, widths: Sequence[int]) -> "DraftTree":
        """Every combination of the top ``widths[j-1]`` tokens of slot ``j`` (``[3, 2, 1]``: 3 + 6 + 6 nodes)."""
        if not widths or any(w < 1 for w in widths):
            raise SDLMError(f"tree widths must be >= 1 per depth, got {list(widths)}: e.g. 3,2,1")
        level: list[Path_] = [()]
        out: list[Path_] = []
        for w in widths:
            level = [p + (r,) for p in level for r in range(w)]
            out.extend(level)
        return cls(tuple(out))

    @classmethod
    def best(cls, counts: dict[Path_, int] | Counter, nodes: int, max_depth: int | None = None) -> "DraftTree":
        """The ``nodes`` rank paths seen most often (``counts`` from :func:`rank_path_counts`).

        A path is accepted exactly when the true continuation's ranks start with
        it, so the expected number of drafts a step accepts is the sum of its
        nodes' frequencies; the most frequent paths maximise it for a given size.
        (A path is never more frequent than its parent, so the set is closed.)
        """
        order = sorted((p for p in counts if max_depth is None or len(p) <= max_depth),
                       key=lambda p: (-counts[p], len(p), p))
        chosen: set[Path_] = set()
        for p in order:
            if len(chosen) >= nodes:
                break
            if len(p) == 1 or p[:-1] in chosen:
                chosen.add(p)
        return cls.from_paths(chosen)

    # ------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def is_chain(self) -> bool:
        return self.paths == DraftTree.chain(self.depth).paths

    @cached_property
    def widths(self) -> list[int]:
        """How many ranked predictions each slot 1..depth must offer."""
        w = [0] * self.depth
        for p in self.paths:
            w[len(p) - 1] = max(w[len(p) - 1], p[-1] + 1)
        return w

    @cached_property
    def parents(self) -> list[int]:
        """Index of each node's parent, -1 for the root (the last committed token)."""
        index = {p: i for i, p in enumerate(self.paths)}
        return [index[p[:-1]] if len(p) > 1 else -1 for p in self.paths]

    @cached_property
    def depths(self) -> list[int]:
        return [len(p) for p in self.paths]

    def nodes_within(self, depth: int) -> int:
        """Number of nodes at depth <= ``depth`` (a prefix of the nodes)."""
        return sum(1 for p in self.paths if len(p) <= depth)

    def to_json(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    # ------------------------------------------------------------ use

    def node_tokens(self, ranked: Sequence[Sequence[int]]) -> list[int]:
        """The draft token of every node; ``ranked[j-1]`` lists slot ``j``'s predictions, best first."""
        return [int(ranked[len(p) - 1][p[-1]]) for p in self.paths]

    def joint_probs(self, ranked_probs: Sequence[Sequence[float]]) -> list[float]:
        """Every node's joint probability: the product, along its rank path, of the probability of slot
        ``j``'s rank ``r_j`` prediction (``ranked_probs[j-1][r]``, as :meth:`node_tokens` reads the tokens)."""
        joint: list[float] = []
        for p, parent in zip(self.paths, self.parents):
            joint.append((joint[parent] if parent >= 0 else 1.0) * float(ranked_probs[len(p) - 1][p[-1]]))
        return joint

    def likely_nodes(self, ranked_probs: Sequence[Sequence[float]], threshold: float) -> list[int]:
        """The nodes (indices, breadth-first) whose joint probability (:meth:`joint_probs`) stays strictly
        above ``threshold``. A node is never likelier than its parent, so the nodes kept are closed under
        parents."""
        return [i for i, q in enumerate(self.joint_probs(ranked_probs)) if q > threshold]

    def likely_ends(self, nodes: Sequence[int], joint: Sequence[float], threshold: float) -> list[int]:
        """Which candidate blocks a step offering ``nodes`` (closed under parents, with their joint
        probabilities ``joint``) carries under a block threshold: 0 is the root's block, ``i + 1`` the block
        of the ``i``-th node offered. A block is carried where the walk ends at its node with a chance of at
        least ``threshold``: the node's joint probability less those of its offered children (the root's:
        1 less those of the nodes at depth 1). The chain's :func:`sdlm.decode.likely_accept_lengths` is the
        case of one child per node."""
        end = [1.0] + [float(q) for q in joint]
        for i, parent in enumerate(self.parents_of(nodes)):
            end[parent + 1] -= float(joint[i])
        return [a for a, chance in enumerate(end) if chance >= threshold]

    def parents_of(self, nodes: Sequence[int]) -> list[int]:
        """The parents of a subtree's nodes (indices into this tree, breadth-first, closed under parents)
        as indices into ``nodes``; -1 for the root."""
        at = {n: i for i, n in enumerate(nodes)}
        try:
            return [at[self.parents[n]] if self.parents[n] >= 0 else -1 for n in nodes]
        except KeyError:
            raise ValueError(f"nodes {list(nodes)} are not closed under parents") from None


class TreeDrafts(list):
    """A tree step's draft tokens (a list, one per node offered) and which nodes of the step's
    :class:`DraftTree` they are (:attr:`nodes`, breadth-first): all of them, or those a draft threshold
    kept; with a block threshold, also their joint probabilities (:attr:`joint`). A slice keeps the nodes
    (and probabilities) of its tokens."""

    def __init__(self, tokens: Iterable[int] = (), nodes: Iterable[int] = (), joint: Iterable[float] | None = None):
        super().__init__(tokens)
        self.nodes = list(nodes)
        self.joint = None if joint is None else [float(q) for q in joint]
        if len(self.nodes) != len(self) or (self.joint is not None and len(self.joint) != len(self)):
            raise ValueError(f"{len(self)} draft tokens need {len(self)} nodes (and probabilities), got "
                             f"{len(self.nodes)}")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TreeDrafts(list.__getitem__(self, i), self.nodes[i], None if self.joint is None else self.joint[i])
        return list.__getitem__(self, i)


def parse_tree(spec: str, model_trees: dict | None, block_size: int) -> DraftTree | None:
    """``--tree`` values: ``none`` (the chain), ``auto`` (the model's calibrated tree for this D),
    widths per depth such as ``3,2,1``, or a JSON file holding a list of rank paths.

    The tree is cut at depth D - 1 (a block of D offers drafts for slots 1..D-1).
    """
    s = (spec or "none").strip()
    if s.lower() in ("none", "chain", ""):
        return None
    if s.lower() == "auto":
        trees = model_trees or {}
        paths = trees.get(str(block_size))
        if paths is None:
            have = ", ".join(sorted(trees)) or "none"
            raise SDLMError(
                f"this model has no calibrated draft tree for block size {block_size} (it has: {have}): run "
                f"`sdlm calibrate-tree --block-size {block_size}` on it, or give widths such as --tree 3,2,1"
            )
        tree = DraftTree.from_paths(paths)
    elif all(part.strip().isdigit() for part in s.split(",")):
        tree = DraftTree.product([int(part) for part in s.split(",")])
    else:
        path = Path(s)
        if not path.is_file():
            raise SDLMError(f"--tree {s!r} is neither 'auto', 'none', widths like 3,2,1, nor a JSON file of rank paths")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SDLMError(f"{path} is not valid JSON ({e}): it must hold a list of rank paths like [[0], [1], [0, 0]]")
        if isinstance(data, dict):  # a calibration file: {"block_size": D, "paths": [...]} or {"4": [...], ...}
            data = data.get("paths", data.get(str(block_size)))
        if not isinstance(data, list) or not all(isinstance(p, list) for p in data):
            raise SDLMError(f"{path} must hold a list of rank paths like [[0], [1], [0, 0]]")
        tree = DraftTree.from_paths(data)
    if block_size < 2:
        raise SDLMError("a draft tree needs block size >= 2 (a block of 1 drafts nothing)")
    if tree.depth > block_size - 1:
        tree = DraftTree(tuple(p for p in tree.paths if len(p) <= block_size - 1))
    if len(tree) == 0:
        raise SDLMError("the draft tree is empty")
    return tree


def tree_visibility(parents: Sequence[int], n_uncached: int, block_size: int) -> torch.Tensor:
    """Which tokens of a tree step may see which, beyond the block rule (True = not restricted).

    The step is ``[uncached (u), nodes (N), root block, node blocks]``. A node key is
    visible only to its own descendants-or-self among nodes, and to the blocks of
    those nodes (the block rule then hides a block's own node, seen through slot 0).
    Returns (T, T) bool over the step's tokens.
    """
    N = len(parents)
    anc = torch.zeros((N, N), dtype=torch.bool)  # anc[i, j]: node j is node i or an ancestor of it
    for i, p in enumerate(parents):
        anc[i, i] = True
        if p >= 0:
            anc[i] |= anc[p]
    T = n_uncached + N + (N + 1) * block_size
    vis = torch.ones((T, T), dtype=torch.bool)
    nodes = slice(n_uncached, n_uncached + N)
    vis[:, nodes] = False
    vis[nodes, nodes] = anc
    base = n_uncached + N
    # the root block (anchored at the last committed token) sees no node; node i's block sees anc[i]
    for i in range(N):
        rows = slice(base + (i + 1) * block_size, base + (i + 2) * block_size)
        vis[rows, nodes] = anc[i]
    return vis


def tree_accept(
    parents: Sequence[int], tokens: Sequence[int], targets: Sequence[int] | Callable[[int], int]
) -> list[int]:
    """Acceptance over a tree: the nodes on the path AR decoding would write.

    ``targets[0]`` is the model's own token after the last committed one and
    ``targets[i + 1]`` the one after node ``i`` (valid when node ``i`` is on the
    path): its greedy choice, or a sample. From the root, step to the child that
    holds the current target while there is one. Returns the accepted nodes in
    order (possibly none). ``targets`` may be a function of the index, called
    only for the nodes the walk reaches, in order: sampling draws each token when
    it is needed, as AR sampling would.
    """
    if len(parents) != len(tokens) or (not callable(targets) and len(targets) != len(tokens) + 1):
        raise ValueError("need one parent and one token per node, and one target more than nodes")
    target = targets if callable(targets) else targets.__getitem__
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    path: list[int] = []
    cur = -1
    while True:
        want = int(target(cur + 1))
        nxt = next((c for c in children.get(cur, ()) if int(tokens[c]) == want), None)
        if nxt is None:
            return path
        path.append(nxt)
        cur = nxt


# ---------------------------------------------------------------- calibration


def rank_path_counts(ranked: torch.Tensor, seq: Sequence[int], n_prompt: int) -> Counter:
    """How often each rank path would have been accepted along a greedy answer.

    ``ranked``: (n_blocks, D, K) from :func:`sdlm.tpf.block_topk` with ``first =
    n_prompt - 1``; ``seq`` = prompt + the model's greedy answer. For the block that
    starts at every answer position, the ranks of the true next tokens in slots
    1, 2, .. form a path (cut at the first token outside the top K); every prefix
    of it is counted once.
    """
    seq = [int(t) for t in seq]
    D = ranked.shape[1]
    c: Counter = Counter()
    for m in range(n_prompt, len(seq) - 1):  # m: the newest committed token; its drafts come from the block at m-1
        row = ranked[m - 1 - (n_prompt - 1)]
        path: Path_ = ()
        for j in range(1, D):
            if m + j >= len(seq):
                break
            hit = (row[j] == seq[m + j]).nonzero()
            if hit.numel() == 0:
                break
            path = path + (int(hit[0]),)
            c[path] += 1
    return c


def calibrate(sdlm, samples: Iterable[tuple[Sequence[int], Sequence[int]]], block_size: int, nodes: int,
              top_k: int = 8, progress: bool = False) -> tuple[DraftTree, Counter]:
    """The ``nodes``-node tree that accepts the most drafts on ``samples`` (prompt ids, greedy answer ids).

    The answers must be the model's own greedy output (with the block-gated adapter: the base
    model's, e.g. from ``sdlm distill``). Returns the tree and the rank path counts.
    """
    from .tpf import block_topk

    if block_size < 2:
        raise SDLMError("calibrating a draft tree needs block size >= 2")
    samples = list(samples)
    counts: Counter = Counter()
    it = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc=f"calibrate D={block_size}", unit="sample", dynamic_ncols=True)
    for prompt, answer in it:
        seq = list(prompt) + list(answer)
        if len(answer) < 2:
            continue
        ranked = block_topk(sdlm, seq, len(prompt) - 1, block_size, top_k)
        counts.update(rank_path_counts(ranked, seq, len(prompt)))
    if not counts:
        raise SDLMError("no usable samples to calibrate on: give prompts with greedy answers of 2+ tokens")
    return DraftTree.best(counts, nodes, block_size - 1), counts


def calibration_samples(tokenizer, records: Iterable[dict], limit: int | None = None, max_answer_tokens: int = 256):
    """(prompt ids, answer ids) from self-distilled chat records (``sdlm distill`` output).

    The answer is the record's ``answer_ids`` when present (the exact greedy tokens), else its last
    assistant message, tokenized. Records without an assistant answer are skipped.
    """
    from .distill import _encode
    from .train.data import to_messages

    out = []
    for rec in records:
        msgs = to_messages(rec)
        if not msgs or msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            continue
        prompt = _encode(tokenizer, msgs[:-1])
        answer = rec.get("answer_ids") or tokenizer(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
        out.append((prompt, list(answer)[:max_answer_tokens]))
        if limit is not None and len(out) >= limit:
            break
    return out


def save_trees(folder: str | Path, trees: dict[int, DraftTree]) -> Path:
    """Store calibrated trees in a model folder's SDLM settings (``--tree auto`` then finds them).

    ``folder``: an adapter folder (``sdlm_adapter.json``) or a full SDLM checkpoint (``config.json``).
    The file is replaced atomically; trees for other block sizes are kept.
    """
    import os
    import tempfile

    folder = Path(folder)
    for name in ("sdlm_adapter.json", "config.json"):
        f = folder / name
        if f.is_file():
            break
    else:
        raise SDLMError(f"{folder} is not a model folder (no sdlm_adapter.json or config.json): give --out FILE instead")
    data = json.loads(f.read_text())
    if not isinstance(data.get("sdlm"), dict):
        raise SDLMError(f"{f} has no SDLM settings: retrofit the model first (sdlm retrofit / sdlm train)")
    known = dict(data["sdlm"].get("draft_trees") or {})
    known.update({str(D): t.to_json() for D, t in trees.items()})
    data["sdlm"]["draft_trees"] = known
    fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", dir=folder)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=2)
        out.write("\n")
    os.chmod(tmp, f.stat().st_mode & 0o777)
    os.replace(tmp, f)
    return f
