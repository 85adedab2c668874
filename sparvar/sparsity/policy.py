"""The SparVAR attention policy: per (layer, scale) dense, CS4A decision, CS4A sparse or CSLA.

State lives for one generation (reset() before each): per CS4A layer, the keys picked at the
decision scale and the residual output there. Nothing here syncs with the host: tables are
built by device ops (and cached where they do not depend on data), statistics keep device
tensors until stats() is asked for.
"""

from __future__ import annotations

import torch

from sparvar.attention.decision import attention_with_colsum
from sparvar.attention.policy import AttentionCall, AttentionPolicy, DenseAttention
from sparvar.attention.sparse import sparse_attention
from sparvar.errors import SparvarError
from sparvar.kernels.fused import add_upsampled_
from sparvar.sparsity import cs4a
from sparvar.sparsity.csla import csla_block_table, csla_token_density
from sparvar.sparsity.presets import Plan, SparVARConfig, make_plan
from sparvar.sparsity.stats import attention_flops, table_pairs


class SparVARPolicy(AttentionPolicy):
    """Runs the plan of `config` (see presets.py); `backend` is passed to sparse_attention."""

    def __init__(self, config: SparVARConfig, name: str = "custom", backend: str = "auto", sdpa_backend: str = "auto"):
        self.config, self.name, self.backend = config, name, backend
        self._dense = DenseAttention(sdpa_backend)
        self.reset()

    def reset(self) -> None:
        self._selected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (indices, valid)
        self._residual: dict[int, torch.Tensor] = {}  # layer -> O_dense - O_sparse at the decision scale
        self._records: dict[tuple[int, int], dict] = {}  # (layer, scale) -> what ran, for stats()
        self._undecided: set[int] = set()  # CS4A layers whose decision scale was pruned: dense after it

    def plan(self, num_layers: int, schedule) -> Plan:
        return make_plan(self.config, num_layers, schedule)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        plan = self.plan(call.num_layers, call.schedule)
        mode = plan.modes[call.layer][call.scale]
        pruned = call.query_index is not None
        if pruned or (mode == "cs4a" and call.layer in self._undecided):
            # tables and key groups are laid out for all queries of a scale: pruned queries run
            # dense, and so do the CS4A scales of a layer whose decision scale was pruned
            if mode == "decision":
                self._undecided.add(call.layer)
            mode = "dense"
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3])
        record = {"mode": mode, "shape": shape, "schedule": call.schedule, "pairs": None, "pruned": pruned}
        self._records[call.layer, call.scale] = record
        if mode == "dense":
            return self._dense(q, k, v, call)
        if mode == "csla":
            table = csla_block_table(call.schedule, call.scale, plan.csla_windows, self.config.q_block,
                                     self.config.key_block, q.device, plan.source_window)
            record["pairs"], record["windows"] = table_pairs(table), (plan.csla_windows, plan.source_window)
            return self._sparse(q, k, v, table, call)
        if mode == "decision":
            return self._decide(q, k, v, call, plan, record)
        return self._cs4a(q, k, v, call, plan, record)

    def _sparse(self, q, k, v, table, call):
        return sparse_attention(q, k, v, table, call.softmax_scale, self.backend)

    def _decide(self, q, k, v, call, plan, record):
        cfg, source = self.config, call.schedule.source_length
        out, colsum = attention_with_colsum(q, k, v, cfg.group, call.softmax_scale, self.backend)
        # the scales' keys are ranked (indices kept from the first scale's token on); a source is windowed
        idx, valid = cs4a.select_keys(colsum[..., source:], plan.topk, cfg.mass)
        self._selected[call.layer] = idx, valid
        if cfg.residual:
            b, h, n, _ = q.shape
            parts = [*self._fixed_keys(call, plan, q.device), (idx + source, valid)]
            table = cs4a.key_table(parts, b, h, n, cfg.group, k.shape[2])
            record["pairs"] = table_pairs(table)
            self._residual[call.layer] = out - self._sparse(q, k, v, table, call)
        return out

    def _fixed_keys(self, call, plan, device) -> list:
        """The key-list parts every CS4A pass of a call has: the sinks and the source's window."""
        return [cs4a.sink_keys(call.schedule, plan.sink_scales, device),
                cs4a.source_keys(call.schedule, call.scale, self.config.group, plan.source_window, device)]

    def _cs4a(self, q, k, v, call, plan, record):
        cfg, S, scale = self.config, plan.decision_scale, call.scale
        if call.layer not in self._selected:
            raise SparvarError(
                f"CS4A at layer {call.layer}, scale {scale} needs the decision scale {S} of this generation "
                "first; call policy.reset() before each generation and run every scale in order"
            )
        idx, valid = self._selected[call.layer]
        group_of = cs4a.group_map(call.schedule, S, scale, cfg.group, q.device)
        idx, valid = idx[:, :, group_of], valid[:, :, group_of]
        if cfg.key_mapping == "remap":
            idx = cs4a.key_remap(call.schedule, S, scale, plan.sink_scales, q.device)[idx]
        else:
            idx = idx + call.schedule.source_length
        local = cs4a.local_keys(call.schedule, scale, cfg.group, plan.local_windows[scale], q.device)
        b, h, n, _ = q.shape
        parts = [*self._fixed_keys(call, plan, q.device), (idx, valid), local]
        table = cs4a.key_table(parts, b, h, n, cfg.group, k.shape[2])
        record["pairs"] = table_pairs(table)  # a tiny device tensor; the table itself is let go
        out = self._sparse(q, k, v, table, call)
        if cfg.residual:
            src, dst = call.schedule.sizes[S], call.schedule.sizes[scale]
            out = add_upsampled_(out, self._residual[call.layer], src, dst)  # out is this call's own
        return out

    def stats(self) -> dict:
        """Densities and attention FLOPs of the last generation, per (layer, scale) and per head.

        block_density: share of the (query, key) pairs the kernels computed (whole blocks);
        token_density: share of pairs the method asked for (CSLA's windows; CS4A's key lists are
        token-exact, so both agree). FLOPs count q.k and p.v over every sample and head; the
        decision scale counts its dense pass plus the residual's sparse pass.
        """
        entries, dense_total, done_total = [], 0.0, 0.0
        for (layer, scale), rec in sorted(self._records.items()):
            b, h, n, kv, d = rec["shape"]
            sparse_share = torch.ones(h, dtype=torch.float64)  # per head, of the sparse pass if any
            if rec["pairs"] is not None:
                sparse_share = rec["pairs"].cpu().expand(b, h).mean(dim=0) / (n * kv)
            dense_flops = b * h * attention_flops(n, kv, d)
            if rec["mode"] == "decision":  # dense pass, plus the residual's sparse pass if any
                block_per_head = token_per_head = torch.ones(h, dtype=torch.float64)
                done = dense_flops * (1.0 + (float(sparse_share.mean()) if rec["pairs"] is not None else 0.0))
            else:
                block_per_head = token_per_head = sparse_share
                if rec["mode"] == "csla":
                    token = csla_token_density(rec["schedule"], scale, *rec["windows"])
                    token_per_head = torch.full((h,), token, dtype=torch.float64)
                done = dense_flops * float(block_per_head.mean())
            entries.append(
                {
                    "layer": layer,
                    "scale": scale,
                    "mode": rec["mode"],
                    "pruned": rec["pruned"],
                    "block_density": float(block_per_head.mean()),
                    "token_density": float(token_per_head.mean()),
                    "block_density_per_head": block_per_head.tolist(),
                    "token_density_per_head": token_per_head.tolist(),
                    "flops_dense": dense_flops,
                    "flops": done,
                    "flops_saved": dense_flops - done,
                }
            )
            dense_total += dense_flops
            done_total += done
        saved = 1.0 - done_total / dense_total if dense_total else 0.0
        return {
            "policy": self.name,
            "entries": entries,
            "total": {"flops_dense": dense_total, "flops": done_total, "saved_fraction": saved},
        }
