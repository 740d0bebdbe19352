"""The valid-prefix tree of a task (SPEC §6), the order nodes are expanded in, and the model
at its nodes.

A node is a token path after the prompt whose text is still a prefix of ``leading · answer ·
terminator`` (as decided by the task's validity index). :class:`Tree` makes nodes (the root, a
node's children, the prefixes of a path) and reads answers off their text;
:class:`BestFirst` hands nodes out by priority (the exact engine, ``diagnose``);
:class:`NodeEvaluator` runs the model on batches of nodes on top of the prompt's KV cache,
computed once, and of the keys and values each node's own token left (a tree cache).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math

import numpy as np

from calibjax import errors
from calibjax.core.rows import to_host
from calibjax.models.decoder import LINEAR
from calibjax.models.language_model import bucket, pad_rows
from calibjax.tasks import Task
from calibjax.tasks.validity import ValidityIndex


@dataclasses.dataclass
class Node:
  """A node of the valid-prefix tree: token ``path`` after the prompt, the validity engine's
  ``state`` and the ``text`` so far, and the path's probability ``mass`` (one per sampler)."""
  path: tuple[int, ...]
  state: int
  text: bytes
  mass: np.ndarray


class Tree:
  """A task's valid-prefix tree over a tokenizer's vocabulary."""

  def __init__(self, task: Task, tokenizer, cache_dir: str | None = None):
    self.task = task
    self.token_bytes = tokenizer.token_bytes()
    self.index = ValidityIndex(task, self.token_bytes, tokenizer.eos_ids, cache_dir=cache_dir)
    self.eos_ids = frozenset(self.index.eos_ids)

  def root(self, mass) -> Node:
    return Node((), self.index.initial_state, b"", np.asarray(mass, np.float64))

  def child(self, node: Node, token: int, mass) -> Node:
    """The node after ``token`` (a valid token at ``node``, EOS excluded)."""
    return Node(node.path + (int(token),), self.index.advance(node.state, token),
                node.text + self.token_bytes[token], mass)

  def prefixes(self, path, mass) -> list[Node]:
    """The nodes at ``path[:0]``, ``path[:1]``, … that are still in the task's language (up
    to the first token that leaves it), each with ``mass``."""
    nodes, state, text = [], self.index.initial_state, b""
    for j, token in enumerate(path):
      if state is None:
        break
      nodes.append(Node(tuple(path[:j]), state, text, mass))
      state = self.index.advance(state, token)
      text += self.token_bytes[token] or b""
    return nodes

  def is_final(self, node: Node) -> bool:
    """The node's text ends in a terminator after a complete answer."""
    return self.index.is_final(node.state)

  def valid_mask(self, node: Node) -> np.ndarray:
    """bool ``[V]``: the tokens that keep the node's text in the task's language."""
    return self.index.mask(node.state, node.text)

  def answer_index(self, text: bytes, terminated: bool) -> int | None:
    """The index of the answer ``text`` spells (with a leading text and, when
    ``terminated``, a terminator), or None."""
    task = self.task
    s = text.decode("utf-8", errors="replace")
    ends = task.terminators if terminated else ("",)
    for lead in task.leading:
      for end in ends:
        if s.startswith(lead) and s.endswith(end) and len(s) >= len(lead) + len(end):
          i = task.answer_index(s[len(lead):len(s) - len(end)])
          if i is not None:
            return i
    return None


class BestFirst:
  """Nodes handed out by decreasing priority; equal priorities leave in the order they came."""

  def __init__(self):
    self._heap, self._count = [], itertools.count()

  def push(self, node: Node, priority: float) -> None:
    heapq.heappush(self._heap, (-priority, next(self._count), node))

  def top(self) -> float:
    """The highest priority queued (``-inf`` when empty)."""
    return -self._heap[0][0] if self._heap else -math.inf

  def pop(self, n: int, min_priority: float = -math.inf) -> list[Node]:
    """Up to ``n`` nodes of priority ≥ ``min_priority``, best first."""
    out = []
    while self._heap and len(out) < n and self.top() >= min_priority:
      out.append(heapq.heappop(self._heap)[2])
    return out

  def __len__(self) -> int:
    return len(self._heap)

  def __iter__(self):
    """The queued nodes, in no particular order."""
    return (node for _, _, node in self._heap)


def canonical_paths(task: Task, tokenizer) -> list[tuple[int, ...]]:
  """Each answer's canonical token path: the tokenisation of the task's first non-empty leading
  text (``""`` if it has none), the answer and the first terminator (what the compounding
  figures follow)."""
  lead = next((l for l in task.leading if l), "")
  return [tuple(tokenizer.encode(lead + a + task.terminators[0], add_bos=False))
          for a in task.answers]


class NodeEvaluator:
  """The model at valid-prefix tree nodes: the prompt's KV cache is computed once and every
  batch of nodes runs on top of it (``batch_size`` rows per call, a fixed shape).

  A tree cache: each node's call keeps the keys and values of the node's own token (on the
  host, ``cache_bytes`` at most), so a node whose parent ran before runs one token on its
  ancestors' keys and values (:meth:`LanguageModel.branch`) instead of its whole path. A batch
  with a node whose parent did not run, and models with Gated DeltaNet layers (whose state is
  not kept per token), run whole paths (:meth:`LanguageModel.extend`); the logits agree to
  float32 rounding."""

  def __init__(self, lm, prompt_ids, tree: Tree, batch_size: int = 32, max_depth: int = 24,
               head=None, cache_bytes: int = 2 << 30):
    if len(prompt_ids) < 2:
      raise errors.InputError("the prompt is empty: it must hold at least one token after BOS.")
    self.lm, self.tree, self.batch_size, self.head = lm, tree, batch_size, head
    self.last = int(prompt_ids[-1])  # each path restarts from it: the root is a path too
    self.base = len(prompt_ids) - 1  # its position
    _, _, self.cache = lm.prefill(np.asarray([prompt_ids[:-1]]), max_new_tokens=max_depth + 1)
    self.own_kv: dict[tuple[int, ...], np.ndarray] | None = (
        None if LINEAR in lm.config.layer_types else {})
    self.cache_bytes = cache_bytes
    self.kept_bytes = 0
    self._pending = None  # the last branch call's (nodes, their keys and values on device)

  def forward(self, nodes: list[Node]):
    """``(logits [batch_size, V], hidden [batch_size, d], valid masks [batch_size, V])``
    (logits through the head when there is one); rows past ``len(nodes)`` repeat the first
    node."""
    n = len(nodes)
    nodes = nodes + nodes[:1] * (self.batch_size - n)
    own = self._keep_pending()
    if own is not None and all(not node.path or node.path[:-1] in own for node in nodes):
      logits, hidden = self._branch(nodes[:n], nodes)
    else:
      ids, mask = pad_rows([(self.last,) + node.path for node in nodes])
      logits, hidden = self.lm.extend(self.cache, ids, mask)
    if self.head is not None:
      logits = self.head(hidden, logits)
    # built while the model runs; its keys and values are copied at the next call, after the
    # caller's work on these logits was queued behind the model
    return logits, hidden, np.stack([self.tree.valid_mask(node) for node in nodes])

  def _keep_pending(self):
    """Keeps the last branch call's keys and values (within ``cache_bytes``); the kept ones."""
    own = self.own_kv
    if self._pending is not None:
      new, token_kv = self._pending
      self._pending = None
      for node, row in zip(new, to_host(token_kv)):
        if self.kept_bytes + row.nbytes <= self.cache_bytes and node.path not in own:
          own[node.path] = row
          self.kept_bytes += row.nbytes
    return own

  def _branch(self, new, nodes):
    """Each node's last token on its ancestors' kept keys and values; the ``new`` nodes'
    own are kept at the next call."""
    own = self.own_kv
    depth = max(len(node.path) for node in nodes)
    width = bucket(depth + 1, minimum=1) - 1  # path slots: few shapes, one compile each
    c = self.lm.config
    kv = np.zeros((len(nodes), width, c.layers, 2, c.kv_heads, c.head_dim), self.lm.dtype)
    pos = np.full((len(nodes), width), -1, np.int32)
    for i, node in enumerate(nodes):
      for j in range(len(node.path)):
        kv[i, j] = own[node.path[:j]]
      pos[i, :len(node.path)] = self.base + np.arange(len(node.path))
    tokens = [node.path[-1] if node.path else self.last for node in nodes]
    logits, hidden, token_kv = self.lm.branch(self.cache, kv, pos, tokens)
    self._pending = (new, token_kv)
    return logits, hidden
