"""Expert parallelism: routed experts split over the `expert` mesh axis, tokens exchanged by all-to-all.

`dispatch_combine(x, idx, w, weights, weight_axes, expert_fn, par)` runs the routed experts of one
MoE layer; the layer (moe/experts.py) gives it the routing and the local expert computation
`expert_fn(rows [R, D], local expert [R], *local weights, group_sizes=None) -> [R, D]` (a row whose
local expert is E_l, the number of local experts, is empty; `group_sizes`: the rows come sorted by
expert, the ragged exchange's). Without a multi-device mesh it calls `expert_fn` on
the T*K (token, expert) rows directly; otherwise inside `jax.shard_map` over the whole mesh:

  tokens  [T, D] split over the batch axes (data x fsdp x expert); routing was done outside, per token
  experts [E, ...] split over `expert` (E_l = E / n_ep per rank) and on their width over `tensor`;
          gathered over `fsdp` at the shard_map boundary (FSDP: XLA all-gathers the weights going
          in and reduce-scatters their gradients coming out)

One file per idea, each readable alone:

  plan.py      the transport for the devices (`mesh.ep_transport`: auto, padded, ragged), the
               buffers' bounds (capacity, dropless chunks, the nodes a token reaches), the hops
  padded.py    the padded transport: fixed buffers by all_to_all, drops counted
  ragged.py    the ragged transport: exactly the rows needed by ragged_all_to_all (emulated on CPU)
  exchange.py  one rank's exchange in one or two hops (across nodes, inside the node), in chunks
  copies.py    redundant experts: their weights made once per step, their gradients sent home
  dispatch.py  dispatch_combine: the shard_map over the mesh that runs all of the above
"""

from parallel.expert_parallel.copies import add_copy_grads, make_copies
from parallel.expert_parallel.dispatch import dispatch_combine, ep_size
from parallel.expert_parallel.padded import padded_slots
from parallel.expert_parallel.plan import (Plan, Transport, capacity, combine, dropless_chunks, fast_plan, fast_rows,
                                           node_capacity, ranks_per_token, resolve_transport)

__all__ = ["Plan", "Transport", "add_copy_grads", "capacity", "combine", "dispatch_combine", "dropless_chunks",
           "ep_size", "fast_plan", "fast_rows", "make_copies", "node_capacity", "padded_slots", "ranks_per_token",
           "resolve_transport"]
