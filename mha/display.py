"""The one display helper every chapter uses: a package object's source, highlighted.

It imports IPython only when called, so ``import mha`` stays framework-free.
"""

from __future__ import annotations

import inspect
import textwrap

__all__ = ["show_source"]


def show_source(*objs) -> None:
    """Displays the source of one or more functions, classes or methods as one highlighted block."""
    if not objs:
        raise TypeError("show_source: pass at least one function, class or method")
    from IPython.display import Code, display

    sources = [textwrap.dedent(inspect.getsource(obj)).rstrip() for obj in objs]  # methods are indented
    display(Code("\n\n\n".join(sources) + "\n", language="python"))
