"""CTR networks composed from small layers (FuxiCTR style): the E0 tower, text towers, fusions.

Configuration lives in `NetConfig` (filled from YAML by the trainer), not in the code.
`CtrTower` is E0; a cascade vector enters it as dense input; a trainable LM's vector joins it
through a `score`, `concat` or `gate` fusion (`TextFusion`). The fusions, and why a warm-started
tower computes E0's logits exactly while W_u = 0: docs/DESIGN.md, "Modules in detail",
ctr_net.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import nn

from nlpctr.config_files import check_integer, is_integer, is_number
from nlpctr.errors import UserError


class Fusion(StrEnum):
    """How the joint model's LM joins the CTR tower (DESIGN.md, "The experiment protocol")."""

    SCORE = "score"  # the LM's click logit added to the tower's
    CONCAT = "concat"  # the pooled vector joins the tower's input
    GATE = "gate"  # the vector, scaled by the tower's state


FUSIONS = tuple(f.value for f in Fusion)  # the flag's choices


@dataclass(frozen=True)
class NetConfig:
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    cross_layers: int = 0  # DCN cross layers before the MLP (0: plain MLP)
    text_projection: int = 32  # size a text vector is projected to before it joins the MLP input

    def __post_init__(self) -> None:
        # A bad width or rate fails here, naming the setting, not as torch's error mid-build (a
        # zero-width layer would even train, on nothing).
        for name, low in (("embedding_dim", 1), ("text_projection", 1), ("cross_layers", 0)):
            value = getattr(self, name)
            check_integer(f"net.{name}", value, low)
        widths = self.hidden
        if not isinstance(widths, tuple | list) or any(not is_integer(w) or w < 1 for w in widths):
            raise UserError(
                f"net.hidden must be a list of layer widths >= 1 (e.g. [128, 64]), got {widths!r}"
            )
        rate = self.dropout
        if not is_number(rate) or not 0 <= rate < 1:
            raise UserError(f"net.dropout must be a probability in [0, 1), got {rate!r}")


@dataclass(frozen=True)
class InputShape:
    """What the data offers the network: vocabulary sizes, dense width, text-vector widths."""

    vocab_sizes: tuple[int, ...]
    dense_dim: int
    cascade_dims: tuple[int, ...] = field(default=())  # precomputed text vectors (E1/E2 features)


class CrossLayer(nn.Module):
    """DCN-v2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = width
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor, added: torch.Tensor | None = None) -> torch.Tensor:
        """`added` joins the first layer's pre-activation (a fused input's W_u u)."""
        if added is None:
            return self.net(x)
        if not len(self.net):
            raise ValueError("an MLP without layers has no first layer to add to")
        return self.net[1:](self.net[0](x) + added)


def base_width(shape: InputShape, config: NetConfig) -> int:
    """Width of E0's concatenated input: ID/context embeddings, dense features, cascade projections."""
    return (
        len(shape.vocab_sizes) * config.embedding_dim
        + shape.dense_dim
        + len(shape.cascade_dims) * config.text_projection
    )


class CtrTower(nn.Module):
    """The E0 network; `extra_dim` widens its MLP input for fused text vectors."""

    def __init__(self, shape: InputShape, config: NetConfig, extra_dim: int = 0) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(
            nn.Embedding(size, config.embedding_dim) for size in shape.vocab_sizes
        )
        self.cascade_projections = nn.ModuleList(
            nn.Linear(dim, config.text_projection) for dim in shape.cascade_dims
        )
        in_dim = base_width(shape, config) + extra_dim
        self.cross = nn.ModuleList(CrossLayer(in_dim) for _ in range(config.cross_layers))
        self.mlp = MLP(in_dim, config.hidden, config.dropout)
        self.head = nn.Linear(self.mlp.out_dim, 1)

    def base_input(
        self, categorical: torch.Tensor, dense: torch.Tensor, cascade: tuple[torch.Tensor, ...] = ()
    ) -> torch.Tensor:
        """The features E0 knows (plus cascade vectors), concatenated."""
        parts = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        parts.append(dense)
        parts += [proj(vec) for proj, vec in zip(self.cascade_projections, cascade, strict=True)]
        return torch.cat(parts, dim=1)

    def penultimate(self, x: torch.Tensor, added: torch.Tensor | None = None) -> torch.Tensor:
        x0 = x
        for layer in self.cross:
            x = layer(x0, x)
        return self.mlp(x, added)

    @property
    def first_width(self) -> int:
        """Output width of the first linear layer the input meets (the MLP's, else the head's)."""
        return self.mlp.net[0].out_features if len(self.mlp.net) else self.head.out_features

    def forward(self, x: torch.Tensor, added: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; `added` joins the first linear layer's pre-activation (see `TextFusion.into_mlp`)."""
        if added is not None and not len(self.mlp.net):
            return (self.head(self.penultimate(x)) + added).squeeze(-1)
        return self.head(self.penultimate(x, added)).squeeze(-1)


class TextFusion(nn.Module):
    """How a trainable LM's pooled vector joins the CTR tower (joint training, E3)."""

    def __init__(self, fusion: str, text_dim: int, base_dim: int, config: NetConfig) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.extra_dim = 0  # columns added to the tower's input (the cross-layer layout only)
        if fusion == Fusion.SCORE:
            self.score = nn.Sequential(
                nn.Linear(text_dim, config.text_projection), nn.Tanh(), nn.Linear(config.text_projection, 1)
            )
        else:
            self.project = nn.Linear(text_dim, config.text_projection)
            if config.cross_layers:
                self.extra_dim = config.text_projection
            else:  # W_u of the first layer: its pre-activation gets W_u u (see the module docstring)
                first = config.hidden[0] if config.hidden else 1
                self.into_mlp = nn.Linear(config.text_projection, first, bias=False)
        if fusion == Fusion.GATE:
            self.gate = nn.Linear(base_dim, config.text_projection)

    def output_layer(self) -> nn.Linear | None:
        """The layer through which the fusion reaches the logit from nothing: zero at a warm start."""
        if self.fusion == Fusion.SCORE:
            return self.score[-1]
        return getattr(self, "into_mlp", None)

    def supplementary(self, text_vector: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The LM's contribution: a logit (score) or the vector that joins the MLP input."""
        if self.fusion == Fusion.SCORE:
            return self.score(text_vector).squeeze(-1)
        projected = self.project(text_vector)
        if self.fusion == Fusion.GATE:
            projected = torch.sigmoid(self.gate(base)) * projected
        return projected


class CtrModel(nn.Module):
    """E0 tower with optional cascade vectors and an optional jointly-trained text fusion.

    `text_vector` is the pooled output of the LM for the row's text (None without an LM);
    the LM itself lives in the trainer so that each unique text is encoded once per batch.
    """

    def __init__(
        self, shape: InputShape, config: NetConfig, fusion: str | None = None, text_dim: int = 0
    ) -> None:
        super().__init__()
        self.fusion = TextFusion(fusion, text_dim, base_width(shape, config), config) if fusion else None
        self.tower = CtrTower(shape, config, extra_dim=self.fusion.extra_dim if self.fusion else 0)

    def forward(
        self,
        categorical: torch.Tensor,
        dense: torch.Tensor,
        cascade: tuple[torch.Tensor, ...] = (),
        text_vector: torch.Tensor | None = None,
    ) -> torch.Tensor:
        base = self.tower.base_input(categorical, dense, cascade)
        if self.fusion is None or text_vector is None:
            return self.tower(base)
        extra = self.fusion.supplementary(text_vector, base)
        if self.fusion.fusion == Fusion.SCORE:
            return self.tower(base) + extra
        if self.fusion.extra_dim:
            return self.tower(torch.cat([base, extra], dim=1))
        return self.tower(base, self.fusion.into_mlp(extra))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Runs saved before the fusion owned W_u kept it as extra columns of the first layer.
        into = f"{prefix}fusion.into_mlp.weight"
        first = f"{prefix}tower.mlp.net.0.weight" if len(self.tower.mlp.net) else f"{prefix}tower.head.weight"
        if self.fusion is not None and hasattr(self.fusion, "into_mlp") and into not in state_dict:
            weight = state_dict.get(first)
            width = (
                self.tower.mlp.net[0].in_features if len(self.tower.mlp.net) else self.tower.head.in_features
            )
            if weight is not None and weight.shape[1] == width + self.fusion.into_mlp.in_features:
                state_dict[first], state_dict[into] = weight[:, :width].clone(), weight[:, width:].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def warm_start(self, baseline: CtrModel) -> None:
        """Start from a trained E0 (same inputs): its tower's weights, and the fusion's output layer
        (the score head's last layer; W_u for concat and gate) at zero, so the model computes exactly
        E0's logits before joint training (bitwise: the tower computes what E0 computes, plus an
        exact zero) and the LM learns what E0 misses."""
        if baseline.fusion is not None:
            raise ValueError("warm start from a model without a text fusion (an E0 run)")
        own = self.tower.state_dict()
        for name, value in baseline.tower.state_dict().items():
            if name not in own:
                raise ValueError(f"the baseline has a tower weight {name} this model lacks")
            target = own[name]
            if target.shape == value.shape:
                target.copy_(value)
            elif target.dim() == 2 and target.shape[0] == value.shape[0] and target.shape[1] > value.shape[1]:
                target.zero_()  # the fused text's extra input columns (cross-layer layout)
                target[:, : value.shape[1]].copy_(value)
            else:
                raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
        self.tower.load_state_dict(own)
        last = self.fusion.output_layer() if self.fusion is not None else None
        if last is not None:
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def penultimate(
        self, categorical: torch.Tensor, dense: torch.Tensor, cascade: tuple[torch.Tensor, ...] = ()
    ) -> torch.Tensor:
        """E0's representation of the non-text features (for redundancy probes)."""
        return self.tower.penultimate(self.tower.base_input(categorical, dense, cascade))


def binomial_loss(logits: torch.Tensor, impressions: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
    """Log loss per impression of aggregated rows: -(c log p + (n - c) log(1 - p)) / sum n."""
    positive = nn.functional.softplus(-logits)  # -log sigmoid(z)
    negative = nn.functional.softplus(logits)  # -log(1 - sigmoid(z))
    return (clicks * positive + (impressions - clicks) * negative).sum() / impressions.sum()


class TextScorer(nn.Module):
    """The E2 LM head: a logit from the pooled text vector alone. With `base_rate`, its output
    bias starts at that click rate's log-odds, so training starts from the base rate instead of
    spending its first steps learning it from p = 0.5."""

    def __init__(self, text_dim: int, hidden: int = 64, base_rate: float | None = None) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(text_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        if base_rate is not None:
            if not 0.0 < base_rate < 1.0:
                raise ValueError(f"base_rate must be in (0, 1), got {base_rate}")
            with torch.no_grad():
                self.head[-1].bias.fill_(math.log(base_rate / (1.0 - base_rate)))

    def forward(self, text_vector: torch.Tensor) -> torch.Tensor:
        return self.head(text_vector).squeeze(-1)
