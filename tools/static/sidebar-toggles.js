/* The navigation (primary) and contents (secondary) sidebar buttons.
 *
 * pydata-sphinx-theme 0.17 wires its mobile sidebars with
 * document.querySelector(".primary-toggle") and (".secondary-toggle"): only the
 * first such button, in the theme's own header that sphinx-book-theme hides,
 * gets a click handler; the buttons a reader sees in the article header get
 * none, so on a phone the menu never opens.
 * https://github.com/pydata/pydata-sphinx-theme/issues/2451
 * Here every other toggle hands its click to the wired one, which opens the
 * sidebar as a dialog on narrow screens and, through sphinx-book-theme's own
 * handler on that same button, collapses the primary sidebar on wide ones.
 * Remove this file once the theme is fixed (the browser test keeps watch).
 */
document.addEventListener("DOMContentLoaded", () => {
  for (const kind of ["primary-toggle", "secondary-toggle"]) {
    const [wired, ...others] = document.querySelectorAll(`button.${kind}`);
    for (const button of others) {
      button.addEventListener("click", (event) => {
        event.preventDefault();
        event.stopPropagation();
        wired.click();
      });
    }
  }
});
