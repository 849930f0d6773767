import pytest
import torch
from torch import nn

from lightning_ensembles.ensembles.surgery import ConversionError, convert, find_modules, replace_modules


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 2))))


def test_convert_walks_nested_modules_and_leaves_original_untouched():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    new, paths = convert(net, lambda p, m: isinstance(m, nn.Linear), lambda p, m: nn.Identity())
    assert paths == ["0", "2.0", "2.1.0"]
    assert all(isinstance(m, nn.Identity) for _, m in find_modules(new, lambda p, m: p in paths))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(net[2][1][0], nn.Linear)


def test_failing_factory_leaves_model_unchanged_and_names_path():
    net = _net()

    def factory(path, m):
        if path == "2.1.0":
            raise ValueError("width 2 cannot be split")
        return nn.Identity()

    with pytest.raises(ConversionError, match=r"'2\.1\.0'.*width 2 cannot be split"):
        replace_modules(net, lambda p, m: isinstance(m, nn.Linear), factory)
    assert isinstance(net[0], nn.Linear) and isinstance(net[2][0], nn.Linear)  # nothing half-converted


def test_selected_module_children_are_not_visited_and_shared_modules_convert_once():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.Sequential(nn.Linear(3, 3)), shared)
    calls = []
    _, paths = convert(
        net,
        lambda p, m: isinstance(m, (nn.Linear, nn.Sequential)) and p != "",
        lambda p, m: calls.append(p) or nn.Identity(),
    )
    assert paths == ["0", "1", "2"]  # "1.0" is inside a selected module
    assert calls == ["0", "1"]  # the shared Linear (paths "0" and "2") is built once
