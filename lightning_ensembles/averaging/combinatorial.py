"""Deep Combinatorial Aggregation (Shen & Cremers, NeurIPS 2022): ensembles of component instances.

A backbone is split into K components; each has ``num_instances`` independent instances. A forward
pass picks one instance per component (a *combination*), so n instances give n^K models for the
memory of n. DCWA instead replaces each component by the mean of its instances' weights.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Literal, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .._checks import check_choice
from ..ensembles.base import Ensemble
from ..ensembles.reinit import reinitialize
from ..losses.base import Regularizer

__all__ = ["CombinatorialEnsemble", "DCAConsistency", "split_by_depth"]

Component = Union[str, Sequence[str]]


def split_by_depth(backbone: nn.Module, num_components: int) -> list[list[str]]:
    """Split ``backbone`` into ``num_components`` consecutive groups of its parameterised layers.

    Layers (modules owning parameters directly) are taken in definition order and cut into
    contiguous groups of near-equal size: input-side layers form component 0.

    Example:
        >>> from lightning_ensembles import MLP
        >>> split_by_depth(MLP(4, 2, hidden=(8, 8)), 2)
        [['net.1', 'net.3'], ['net.5']]
    """
    layers = [n for n, m in backbone.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not 1 <= num_components <= len(layers):
        raise ValueError(
            f"`components`={num_components} must be between 1 and the number of parameterised layers ({len(layers)})."
        )
    bounds = [round(k * len(layers) / num_components) for k in range(num_components + 1)]
    return [layers[bounds[k] : bounds[k + 1]] for k in range(num_components)]


class CombinatorialEnsemble(Ensemble):
    """Deep Combinatorial Aggregation: components with several instances, combined at random.

    Args:
        backbone: the model to split (used as instance 0 of every component).
        components: module paths, one per component (a path or a list of paths, e.g.
            ``["net.1", ["net.3", "net.5"]]``), or an integer K to split by depth
            (:func:`split_by_depth`). Parameters outside every component are shared.
        num_instances: independent instances per component (the paper's default is 5).
        draws_per_step: random combinations per training batch; each is one row of the training
            output ``(draws_per_step, B, ...)`` and gets its own loss (add :class:`DCAConsistency`
            for the paper's consistency term).
        eval_mode: ``"sample"`` evaluates ``num_eval_samples`` combinations drawn once with
            ``seed``; ``"all"`` evaluates every one of the ``num_instances ** K`` combinations.
        init: ``"reinit"`` re-initialises every extra instance; ``"copy"`` starts them equal.

    ``num_members`` is the number of combinations evaluated; training returns ``draws_per_step`` rows.

    Example:
        >>> import torch
        >>> from lightning_ensembles import MLP
        >>> dca = CombinatorialEnsemble(MLP(4, 3, hidden=(8,)), components=2, num_instances=3, eval_mode="all")
        >>> len(dca.combinations()), dca.eval()(torch.randn(5, 4)).shape
        (9, torch.Size([9, 5, 3]))
        >>> dca.weight_averaged()(torch.randn(5, 4)).shape  # DCWA
        torch.Size([5, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        components: int | Sequence[Component] = 2,
        num_instances: int = 5,
        draws_per_step: int = 1,
        eval_mode: Literal["sample", "all"] = "sample",
        num_eval_samples: int = 64,
        seed: int = 0,
        init: Literal["reinit", "copy"] = "reinit",
    ) -> None:
        if isinstance(components, int):
            groups = split_by_depth(backbone, components)
        else:
            groups = [[c] if isinstance(c, str) else list(c) for c in components]
            if not groups or any(not g for g in groups):
                raise ValueError("`components` must be a positive integer or a non-empty list of module paths.")
        if num_instances < 1 or draws_per_step < 1 or num_eval_samples < 1:
            raise ValueError("`num_instances`, `draws_per_step` and `num_eval_samples` must all be >= 1.")
        check_choice("eval_mode", eval_mode, ("sample", "all"))
        check_choice("init", init, ("reinit", "copy"))
        flat = [p for g in groups for p in g]
        for p in flat:
            try:
                backbone.get_submodule(p)
            except AttributeError as err:
                raise ValueError(f"`components`: the backbone has no module {p!r}.") from err
        if len(set(flat)) != len(flat) or any(a != b and b.startswith(a + ".") for a in flat for b in flat):
            raise ValueError(f"`components` must not overlap, got {groups}.")
        total = num_instances ** len(groups)
        super().__init__(total if eval_mode == "all" else num_eval_samples)
        self.backbone = backbone
        self.component_paths = groups
        self.num_instances = num_instances
        self.draws_per_step = draws_per_step
        self.eval_mode = eval_mode
        # Extra instances (1..n-1) of component k: instances[k][j-1][i] copies module component_paths[k][i].
        self.instances = nn.ModuleList()
        for g in groups:
            per_instance = nn.ModuleList()
            for _ in range(num_instances - 1):
                copies = nn.ModuleList([copy.deepcopy(backbone.get_submodule(p)) for p in g])
                if init == "reinit":
                    for c in copies:
                        reinitialize(c)
                per_instance.append(copies)
            self.instances.append(per_instance)
        gen = torch.Generator().manual_seed(seed)
        if eval_mode == "all":
            combos = list(itertools.product(range(num_instances), repeat=len(groups)))
        else:
            combos = [
                tuple(torch.randint(num_instances, (len(groups),), generator=gen).tolist())
                for _ in range(num_eval_samples)
            ]
        self._eval_combinations = combos

    @property
    def num_components(self) -> int:
        return len(self.component_paths)

    def combinations(self) -> list[tuple[int, ...]]:
        """The combinations evaluated in eval mode (instance index per component)."""
        return list(self._eval_combinations)

    def _instances(self, k: int) -> list[nn.ModuleList]:
        """The extra instances of component ``k`` (``[j - 1][i]``: instance ``j`` of module ``component_paths[k][i]``)."""
        return [cast(nn.ModuleList, inst) for inst in cast(nn.ModuleList, self.instances[k])]

    def _state_for(self, combo: Sequence[int]) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for k, j in enumerate(combo):
            if j == 0:
                continue  # instance 0 lives in the backbone itself
            for path, module in zip(self.component_paths[k], self._instances(k)[j - 1]):
                for n, t in itertools.chain(module.named_parameters(), module.named_buffers()):
                    state[f"{path}.{n}"] = t
        return state

    def forward_combination(self, x: Tensor, combo: Sequence[int]) -> Tensor:
        """Output ``(B, ...)`` of one combination."""
        return functional_call(self.backbone, self._state_for(combo), (x,))

    def random_combination(self) -> tuple[int, ...]:
        return tuple(torch.randint(self.num_instances, (self.num_components,)).tolist())

    def forward(self, x: Tensor) -> Tensor:
        """Training: ``(draws_per_step, B, ...)`` random combinations; eval: ``(num_members, B, ...)``."""
        combos = (
            [self.random_combination() for _ in range(self.draws_per_step)]
            if self.training
            else self._eval_combinations
        )
        return torch.stack([self.forward_combination(x, c) for c in combos])

    def member_targets(self, target: Tensor) -> Tensor:
        """Targets repeated for each row of :meth:`forward` (``draws_per_step`` rows in training)."""
        rows = self.draws_per_step if self.training else self.num_members
        return target.unsqueeze(0).expand(rows, *target.shape)

    def member(self, index: int) -> nn.Module:
        """Combination ``index`` of :meth:`combinations` as a standalone backbone."""
        index = self._check_index(index)
        model = copy.deepcopy(self.backbone)
        model.load_state_dict(
            {
                **model.state_dict(),
                **{k: v.detach() for k, v in self._state_for(self._eval_combinations[index]).items()},
            }
        )
        return model

    @torch.no_grad()
    def weight_averaged(self) -> nn.Module:
        """DCWA: a copy of the backbone whose components are the elementwise mean of their instances.

        Integer buffers (BatchNorm counters) come from instance 0; recompute BatchNorm statistics
        with :func:`~lightning_ensembles.averaging.update_bn` if the backbone has BatchNorm.
        """
        model = copy.deepcopy(self.backbone)
        for k, paths in enumerate(self.component_paths):
            for i, path in enumerate(paths):
                target = model.get_submodule(path)
                others = [
                    dict(itertools.chain(inst[i].named_parameters(), inst[i].named_buffers()))
                    for inst in self._instances(k)
                ]
                for n, t in itertools.chain(target.named_parameters(), target.named_buffers()):
                    if t.is_floating_point():
                        t.copy_(torch.stack([t] + [o[n] for o in others]).mean(0))
        return model


class DCAConsistency(Regularizer):
    """The DCA consistency term: ``KL(softmax(ref) || softmax(logits_r))`` averaged over draws.

    The reference of draw ``r`` is the (detached) output of draw ``r - 1``; draw 0's reference is
    one more random combination run without gradients, as in the official training step.
    Use with ``weight=1.0`` for the paper's ``(CE + KL) / R`` per draw.

    Args:
        weight: multiplier of the value in the training loss (``loss += weight * value``); 0 turns the term off. ``1.0``
            is the paper's objective.
        name: logged as ``train/<name>``.

    Example:
        >>> import torch
        >>> from lightning_ensembles import MLP
        >>> dca = CombinatorialEnsemble(MLP(4, 3, hidden=(8,)), components=2, num_instances=3, draws_per_step=2)
        >>> x = torch.randn(5, 4)
        >>> bool(DCAConsistency(weight=1.0)(dca(x), None, inputs=x, ensemble=dca).detach() >= 0)
        True
    """

    def forward(
        self, outputs: Tensor, target: Tensor, inputs: Tensor | None = None, ensemble: nn.Module | None = None
    ) -> Tensor:
        if not isinstance(ensemble, CombinatorialEnsemble) or inputs is None:
            raise ValueError("DCAConsistency needs `ensemble` (a CombinatorialEnsemble) and `inputs`.")
        with torch.no_grad():
            ref = ensemble.forward_combination(inputs, ensemble.random_combination())
        refs = torch.cat([ref.unsqueeze(0), outputs[:-1].detach()])
        log_p = F.log_softmax(outputs, dim=-1)
        log_ref = F.log_softmax(refs, dim=-1)
        kl = (log_ref.exp() * (log_ref - log_p)).sum(-1)
        return kl.mean()
