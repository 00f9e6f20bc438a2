"""SDXL's added conditions: the UNet's ``text_embeds`` (pooled text) and ``time_ids`` inputs, and the
empty-negative-prompt rule.

Time ids, as diffusers' StableDiffusionXL pipelines build them (``_get_add_time_ids``), each a (height, width) or
(top, left) pair in pixels: the base takes original_size + crops_coords_top_left + target_size (6 ids); the refiner
takes original_size + crops_coords_top_left + aesthetic_score (5 ids), with negative_aesthetic_score on the
unconditional rows. original_size and target_size default to the generated size, the crop to (0, 0); negative_*
values default to the positive ones. The pooled embedding of a long prompt is its first chunk's (A1111's rule).

``zeros_for_empty_prompt`` (diffusers' force_zeros_for_empty_prompt, set for the base): with guidance and no negative
prompt at all (None), the unconditional context and pooled rows are zeros instead of the encoded empty prompt.

Families without added conditions (SD 1.x/2.x) get no extra inputs and the context unchanged. NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Pair = tuple[int, int]


@dataclass(frozen=True)
class SizeConditions:
    """What ``generate`` accepts for SDXL's micro-conditioning (None = diffusers' default)."""

    original_size: Pair | None = None
    target_size: Pair | None = None
    crops_coords_top_left: Pair = (0, 0)
    negative_original_size: Pair | None = None
    negative_target_size: Pair | None = None
    negative_crops_coords_top_left: Pair | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def time_ids(self, num_ids: int, height: int, width: int) -> tuple[list[float], list[float]]:
        """(unconditional row, conditional row) of time ids for a model taking ``num_ids`` (6 base, 5 refiner)."""
        original = _pair(self.original_size, "original_size") or (height, width)
        target = _pair(self.target_size, "target_size") or (height, width)
        crop = _pair(self.crops_coords_top_left, "crops_coords_top_left")
        neg_original = _pair(self.negative_original_size, "negative_original_size") or original
        neg_target = _pair(self.negative_target_size, "negative_target_size") or target
        neg_crop = _pair(self.negative_crops_coords_top_left, "negative_crops_coords_top_left") or crop
        if num_ids == 6:
            return [*neg_original, *neg_crop, *neg_target], [*original, *crop, *target]
        if num_ids == 5:
            return ([*neg_original, *neg_crop, float(self.negative_aesthetic_score)],
                    [*original, *crop, float(self.aesthetic_score)])
        raise ValueError(f"this UNet takes {num_ids} time ids; rtsd knows SDXL base (6) and refiner (5)")


def _pair(value, name: str) -> Pair | None:
    if value is None:
        return None
    try:
        first, second = value
        return int(first), int(second)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of integers (height, width) / (top, left), got {value!r}") from None


def condition(config, xp, context, pooled, rows: int, use_cfg: bool, negative_prompt_given: bool,
              conditions: SizeConditions, height: int, width: int):
    """(context, extra UNet feeds) for one generation; ``rows`` images, negatives first when ``use_cfg``."""
    if not config.pooled_dim:
        return context, {}
    if use_cfg and config.zeros_for_empty_prompt and not negative_prompt_given:
        context = xp.concatenate([context[:rows] * 0, context[rows:]])
        pooled = xp.concatenate([pooled[:rows] * 0, pooled[rows:]])
    negative, positive = conditions.time_ids(config.num_time_ids, height, width)
    table = np.array(([negative] * rows if use_cfg else []) + [positive] * rows, dtype=np.float32)
    return context, {"text_embeds": pooled, "time_ids": xp.asarray(table)}
