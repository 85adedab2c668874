"""The demo transformer's teacher-forcing step, made cheap on a GPU (issue 22).

A step quantises a batch of the frozen tokenizer's latents with random bit flips (bitwise
self-correction), encodes the prompts with the byte-level T5 (some dropped to the learned empty
prompt, for guidance), runs the transformer over every scale under the block-causal mask and
takes the bits' cross-entropy, scale k weighing sqrt(n_k) in all. What makes it cheap:

- the loss is the binary cross-entropy of each bit's logit difference (l1 - l0): the same number
  as the 2-way softmax cross-entropy, computed from half the values;
- torch.compile fuses the blocks' elementwise work (norms, modulation, RoPE, residual adds,
  which dominate at width 256): `compile="graph"` compiles the transformer and the loss as one
  graph, `compile="blocks"` one block, whose code every block then shares (a tenth of the
  compile time: it starts afresh on every new GPU machine);
- `attention="flex"` gives each layer one FlexAttention call over the whole sequence with a
  block-causal BlockMask, where "sdpa" makes one SDPA call per scale (`PrefixAttend`).

`benchmarks/demo_train_step.md` (`sparvar bench train-step`) measures what each of these buys.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sparvar.demo.tokenizer import quantize
from sparvar.models.base import Attend
from sparvar.models.infinity.bitwise import BitwiseCodes
from sparvar.models.infinity.transformer import InfinityTransformer, PrefixAttend
from sparvar.schedules import Schedule

ATTENTION = ("sdpa", "flex")
COMPILE = ("off", "graph", "blocks")


def scale_weights(schedule: Schedule, device) -> torch.Tensor:
    """Per-token loss weights: scale k weighs sqrt(n_k) in all, so the few coarse tokens that set
    the layout are not drowned by the thousands of the last scales; normalised to sum 1."""
    w = torch.cat([torch.full((n,), n**-0.5) for n in schedule.lengths])
    return (w / w.sum()).to(device)


class BlockCausalFlex(Attend):
    """Teacher forcing's mask as one FlexAttention call: a token sees every token of its own and
    the earlier scales. Blocks of 128 x 128 wholly inside the mask run unmasked, those wholly
    outside are skipped; only blocks across a scale's end evaluate the mask."""

    def __init__(self, schedule: Schedule, device):
        from torch.nn.attention.flex_attention import create_block_mask

        ends = torch.tensor([start + n for start, n in zip(schedule.offsets, schedule.lengths)])
        visible = torch.repeat_interleave(ends, torch.tensor(schedule.lengths)).to(device)  # keys a token sees

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < visible[q_idx]

        total = schedule.total
        self.mask = create_block_mask(mask_mod, None, None, total, total, device=device)

    def __call__(self, layer, q, k, v):
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q.to(v.dtype), k.to(v.dtype), v, block_mask=self.mask, scale=1.0)


class TeacherForcing:
    """The loss of one batch for a transformer, its text encoder and one schedule."""

    def __init__(self, model: InfinityTransformer, text: torch.nn.Module, codes: BitwiseCodes, schedule: Schedule,
                 attention: str = "sdpa", compile: str = "off"):
        if attention not in ATTENTION or compile not in COMPILE:
            raise ValueError(f"attention must be one of {ATTENTION} and compile one of {COMPILE}, "
                             f"got {attention!r} and {compile!r}")
        self.model, self.text, self.codes, self.schedule = model, text, codes, schedule
        device = model.device
        self.token_weights = scale_weights(schedule, device)
        self.attend = PrefixAttend(schedule) if attention == "sdpa" else BlockCausalFlex(schedule, device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        model.rope(schedule)  # built outside the compiled graph
        self.blocks = [torch.compile(block) for block in model.blocks] if compile == "blocks" else None
        self.transformer_loss = torch.compile(self._transformer_loss) if compile == "graph" else self._transformer_loss
        bounds, k = np.cumsum((0,) + schedule.lengths), len(schedule)
        self.reported = {f"acc{s}": (int(bounds[s]), int(bounds[s + 1])) for s in sorted({0, k // 3, 2 * k // 3, k - 1})}

    def _transformer_loss(self, inputs, feats, mask, drop, bits):
        model = self.model
        with self.autocast:
            empty = model.cfg_uncond[: feats.shape[1]].float()  # the learned empty prompt guidance runs with
            feats = torch.where(drop[:, None, None], empty, feats)
            prep = model.prepare((feats, mask), guidance=False)
            logits = model.forward_full(inputs, self.schedule, prep, self.attend, self.blocks)
        diff = logits[..., 1] - logits[..., 0]  # (B, L, bits): a bit is 1 where its logit difference is positive
        ce = F.binary_cross_entropy_with_logits(diff, bits.float(), reduction="none").mean(-1)
        correct = ((diff > 0) == bits.bool()).float().mean((0, 2))
        return (ce * self.token_weights).sum(-1).mean(), correct

    def __call__(self, latents: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, flip: torch.Tensor,
                 drop: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """latents (B, c, h, w) on the schedule's last grid; ids, mask (B, T) the prompts' bytes;
        flip (B,) each sample's share of flipped bits; drop (B,) bool: prompts replaced by the
        empty one. Returns the loss and the bit accuracy of a few scales."""
        bits, inputs, _ = quantize(latents, self.schedule, self.codes, flip, generator)
        with self.autocast:
            feats = self.text(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        loss, correct = self.transformer_loss(inputs, feats, mask, drop, torch.cat(bits, dim=1))
        metrics = {"loss": loss}
        correct = correct.detach()
        metrics.update({name: correct[a:b].mean() for name, (a, b) in self.reported.items()})
        return metrics
