"""How one MoE layer's tokens travel: the transport for the devices, the buffers' bounds, the plan.

`mesh.ep_transport`: padded (padded.py), ragged (ragged.py) or auto, padded on CPU and on v5e slices
above 32 chips (libtpu has no ragged-all-to-all there), ragged elsewhere (`resolve_transport`, once,
from the mesh's devices).

The n_ep expert-parallel ranks form `mesh.ep_nodes` nodes of n_in = n_ep / nodes neighbouring ranks
(the closest devices: a GPU host, a TPU slice, or any split of the axis); a node holds the experts of
its ranks, a contiguous range. An exchange is one `Hop` among some of the ranks: all of them (one
level), a node's ranks (inside the node), or the ranks with one position in every node (across nodes).

Device-limited routing (DeepSeek-V2/V3) picks a token's experts within `topk_group` of `n_group`
groups; groups are contiguous expert ranges and so are nodes, so when groups nest in nodes (or
nodes in groups) a token reaches at most `ranks_per_token(E, nodes, K, n_group, topk_group)` nodes:
V3's 8 experts within 4 of 8 groups, with a group per node, cross the slow links 4 times, not 8.
The layer passes what its router really enforces (`moe.router.reach`: no limit under `greedy`
routing or one group, so a token may reach every node).

Dropless exchanges size their receive buffers for the worst case, every rank's tokens choosing
this rank's experts; the tokens then go in chunks (`dropless_chunks`, `mesh.ep_chunks`). Every chunk
reads the local experts' weights and adds into their gradients again, and every full-buffer operation
(the buffers' zeros, the sort by expert and back) pays for the rows no token fills, 7/8 of them for V3
on 8 ranks. The ragged exchange first tries a fast path (`mesh.ep_fast_path`, exchange.py:
`with_fast_path`): all tokens at once in buffers of a few times the balanced receive (`fast_plan`; in two
levels also of the token rows a rank receives across nodes and of the assignments it passes on inside
its node), taken when no rank would need more, the chunked worst case otherwise.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from parallel.common.errors import ConfigError

log = logging.getLogger("parallel")

Transport = Literal["auto", "padded", "ragged"]
TRANSPORTS = ("auto", "padded", "ragged")


# libtpu does not compile ragged-all-to-all on v5e slices of 8x8 chips and more ("Ragged all-to-all is
# currently not supported in limited ICI routing settings"); v4, v5p and v6e compile it.
V5E_RAGGED_MAX_CHIPS = 32


def ragged_unsupported(mesh) -> str | None:
  """Why `mesh`'s devices cannot run ragged_all_to_all (None: they can)."""
  device = mesh.devices.flat[0]
  if device.platform == "tpu" and device.device_kind == "TPU v5 lite" and mesh.size > V5E_RAGGED_MAX_CHIPS:
    return f"libtpu has no ragged-all-to-all on v5e slices above {V5E_RAGGED_MAX_CHIPS} chips"
  return None


def resolve_transport(name: str, mesh) -> str:
  """'padded', 'ragged' or (CPU only) 'ragged_emulated' for the configured `name` on `mesh`'s devices."""
  if name not in TRANSPORTS:
    raise ConfigError(f"mesh.ep_transport={name!r} must be one of {', '.join(TRANSPORTS)}")
  platform = mesh.devices.flat[0].platform
  why_not = ragged_unsupported(mesh)
  if name == "auto":
    if why_not:
      log.info("expert parallel: padded transport (%s)", why_not)
    return "padded" if platform == "cpu" or why_not else "ragged"
  if name == "ragged" and platform == "cpu":
    log.info("expert parallel: XLA:CPU has no ragged-all-to-all; emulating it with all_gather")
    return "ragged_emulated"
  if name == "ragged" and why_not:
    raise ConfigError(f"mesh.ep_transport=ragged: {why_not}; use padded (or auto)")
  return name


def ranks_per_token(n_experts: int, n_ep: int, k: int, n_group: int, topk_group: int) -> int:
  """Most of `n_ep` equal contiguous expert ranges (ranks, or nodes of ranks) one token's K
  assignments can reach under device-limited routing."""
  bound = min(k, n_ep)
  if n_group > 1 and n_experts % n_group == 0:
    if n_group % n_ep == 0:
      bound = min(bound, topk_group)
    elif n_ep % n_group == 0:
      bound = min(bound, topk_group * (n_ep // n_group))
  return bound


# A dropless exchange must size its receive buffers for the worst case: every token of every rank
# choosing this rank's experts, n_ep * min(K, E_l) rows per local token against K when balanced (8x for
# DeepSeek-V3 on 8 expert ranks). The tokens then go in chunks, one at a time, each chunk's buffers
# recomputed in the backward pass rather than kept, so that a chunk's worst case is at most this many
# times the balanced receive of all the tokens. (DeepSeek-V3 on v5p-1024, fsdp=64 x expert=8, remat
# full: 63.3 GiB of temporaries per chip in one go, 45.4 GiB in 4 chunks, 35.4 GiB in the 8 chunks of
# factor 1, as much as the padded transport with capacity factor 1.25, which drops; docs/pods.md.)
CHUNK_BUFFER_FACTOR = 1


def dropless_chunks(t: int, k: int, n_ep: int, e_local: int, given: int | None = None) -> int:
  """Chunks of the `t` local tokens for a dropless exchange (`given`: mesh.ep_chunks)."""
  if given is not None:
    if given < 1 or t % given:
      raise ConfigError(f"mesh.ep_chunks={given} must divide the {t} tokens each expert-parallel rank holds")
    return given
  want = math.ceil(n_ep * min(k, e_local) / (CHUNK_BUFFER_FACTOR * k))
  return next(c for c in range(max(1, want), t + 1) if t % c == 0)


def fast_rows(t: int, k: int, n_ep: int, e_local: int, factor: float) -> int:
  """Receive-buffer rows of the dropless exchange's fast path (`mesh.ep_fast_path`): `factor` times a
  rank's balanced receive of its `t` tokens' assignments, at most the worst case."""
  return min(n_ep * t * min(k, e_local), math.ceil(factor * t * k))


def fast_plan(plan: Plan, t: int, k: int, e_local: int, factor: float) -> Plan:
  """`plan` with the fast path's buffers for `t` tokens a rank (`mesh.ep_fast_path`=`factor`): `factor`
  times a rank's balanced share, at most the worst case. Balanced, a rank receives t * K assignments for
  its experts; in two levels it also receives t * nodes_per_token token rows across nodes (each token
  goes to at most that many nodes) and passes t * K assignments of them on inside its node."""
  receive = fast_rows(t, k, plan.n_ep, e_local, factor)
  if plan.nodes == 1:
    return plan._replace(receive_rows=receive)
  n_in = plan.n_ep // plan.nodes
  across = min(plan.nodes * t, math.ceil(factor * t * plan.nodes_per_token))
  inside = min(across * min(k, e_local * n_in), math.ceil(factor * t * k))
  return plan._replace(receive_rows=min(receive, n_in * inside), across_rows=across, inside_rows=inside)


def capacity(t: int, k: int, n_ep: int, e_local: int, capacity_factor: float | None, rows: int | None = None) -> int:
  """Assignments per (source, destination) rank pair of the padded transport, for `t` tokens per rank
  whose assignments come from `rows` rows (default t; more in the two-level dispatch's second hop)."""
  dropless = (t if rows is None else rows) * min(k, e_local)
  if capacity_factor is None:
    return dropless
  return max(1, min(dropless, math.ceil(capacity_factor * t * k / n_ep)))


def node_capacity(t: int, nodes_per_token: int, nodes: int, capacity_factor: float | None) -> int:
  """Tokens per (source rank, destination node) of the two-level padded dispatch: a token goes to a
  node once, to at most `nodes_per_token` of the `nodes`."""
  if capacity_factor is None:
    return t
  return max(1, min(t, math.ceil(capacity_factor * t * nodes_per_token / nodes)))


class Plan(NamedTuple):
  """How one MoE layer's tokens travel on this mesh (static)."""

  axes: tuple[str, ...]  # the expert-parallel mesh axes
  n_ep: int
  nodes: int  # mesh.ep_nodes: 1, one level; > 1, across nodes once per node, then inside the node
  transport: str  # padded | ragged | ragged_emulated
  capacity_factor: float | None  # padded; None: dropless
  nodes_per_token: int  # the most nodes one token's experts live on (device-limited routing)
  # the ragged fast path's buffers (fast_plan; None: the worst case): the rows a rank receives (its
  # experts' rows) and, in two levels, the token rows it receives across nodes and the assignments
  # among those it sends inside its node
  receive_rows: int | None = None
  across_rows: int | None = None
  inside_rows: int | None = None

  def bounds(self) -> tuple[int, ...]:
    """The fast path's buffers, in the order exchange.loads counts what they must hold."""
    return (self.receive_rows,) if self.nodes == 1 else (self.across_rows, self.inside_rows, self.receive_rows)


class Hop(NamedTuple):
  """One exchange among `n` expert-parallel ranks: all of them (`groups` None) or, in the two-level
  dispatch, each rank's node (inner) or the ranks with its position in the other nodes (outer)."""

  axes: tuple[str, ...]
  n: int
  groups: list[list[int]] | None
  member: jax.Array  # this rank's position among its n peers

  def a2a(self, x):
    return jax.lax.all_to_all(x, self.axes, 0, 0, tiled=True, axis_index_groups=self.groups)


def hops(plan, rank) -> tuple[Hop, Hop]:
  """(across nodes: the ranks with this rank's position in every node, inside this rank's node)."""
  n_in = plan.n_ep // plan.nodes
  outer = Hop(plan.axes, plan.nodes, [[i + n_in * g for g in range(plan.nodes)] for i in range(n_in)]
              if n_in > 1 else None, rank // n_in)
  inner = Hop(plan.axes, n_in, [[g * n_in + i for i in range(n_in)] for g in range(plan.nodes)]
              if plan.nodes > 1 else None, rank % n_in)
  return outer, inner


EXCHANGED = "ep_exchanged"  # the checkpoint name of the rows an exchange received or returned


def combine(y_NxD, w_TxK):
  """sum_k w[t, k] y[t * K + k]: the weighted sum of each token's expert outputs."""
  t, k = w_TxK.shape
  return jnp.einsum("tkd,tk->td", y_NxD.reshape(t, k, -1), w_TxK.astype(y_NxD.dtype))


def group_sum(y_NxD, m: int, w_N=None):
  """[N / m, D]: the sum of each m consecutive rows (times w_N [N], if given), as a transport's return
  trip gives each row (m = K: a row's assignments) or token (m = nodes: its trips across nodes) its
  results."""
  if w_N is not None:
    return combine(y_NxD, w_N.reshape(-1, m))
  return y_NxD.reshape(-1, m, y_NxD.shape[-1]).sum(1)


def exclusive(c):
  return (jnp.cumsum(c) - c).astype(jnp.int32)


def padded_take(table, rows, fill):
  """table[rows], a row index of len(table) giving `fill`."""
  pad = jnp.full((1, *table.shape[1:]), fill, table.dtype)
  return jnp.concatenate([table, pad])[rows]
