"""help() is useful for every public name: each class and function of ``tritonorm.__all__``
and ``tritonorm.functional.__all__`` has a docstring with Args and Example sections, as
torch.nn's, and each layer a Shape section."""

import inspect

import pytest
from torch import nn

import tritonorm
from tritonorm import functional as F


def _public():
    for module, names in ((tritonorm, tritonorm.__all__), (F, F.__all__)):
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield pytest.param(obj, id=f"{module.__name__}.{name}")


@pytest.mark.parametrize("obj", list(_public()))
def test_public_docstring_has_sections(obj):
    doc = inspect.getdoc(obj) or ""
    sections = ["Args:", "Example::"]
    if inspect.isclass(obj) and issubclass(obj, nn.Module):
        sections.append("Shape:")
    missing = [s for s in sections if s not in doc]
    assert not missing, f"{obj.__qualname__}'s docstring has no {', '.join(missing)} section"


def test_docstrings_cite_papers_by_name():
    """No "seed 00x" or "the issue" in what help() shows."""
    for param in _public():
        doc = (inspect.getdoc(param.values[0]) or "").lower()
        assert "seed 00" not in doc and "issue" not in doc, param.id
