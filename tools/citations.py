"""A local Sphinx extension: one citation style, author-year, in the text and in the list.

sphinxcontrib-bibtex's `author_year` reference style (bibtex_reference_style
in _config.yml) writes "[Vaswani et al., 2017]" in the text; its default
bibliography style labels the same entry [VSP+17]. This registers a pybtex
style, "authoryear" (bibtex_default_style), whose labels are the in-text ones,
sorted by author and year. arXiv entries carry an `eprint` field, which the
style (pybtex's unsrt) links to https://arxiv.org/abs/<id>: a link, nothing
loaded from there.
"""

from __future__ import annotations

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle


def _last_names(person) -> str:
    return " ".join(name.render_as("text") for name in person.rich_prelast_names + person.rich_last_names)


def author_year_label(entry) -> str:
    """'Vaswani et al., 2017', 'Milakov and Gimelshein, 2018', 'Ba, 2016': the in-text form."""
    people = [_last_names(p) for p in entry.persons.get("author", [])]
    if len(people) >= 3:
        who = f"{people[0]} et al."
    else:
        who = " and ".join(people) or entry.key
    return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        for entry in sorted_entries:
            yield author_year_label(entry)


class AuthorYearStyle(UnsrtStyle):
    default_label_style = "authoryear"
    default_sorting_style = "author_year_title"


def setup(app):
    register_plugin("pybtex.style.labels", "authoryear", AuthorYearLabels, force=True)
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle, force=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
