"""The site builds with warnings as errors, from exactly the stored outputs."""


def test_book_builds_without_a_warning(built_site):
    html, problems = built_site
    assert not problems, "\n".join(problems)
    assert (html / "index.html").exists()
