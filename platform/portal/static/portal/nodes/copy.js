// Copy buttons of the node pages: <button data-copy="id-of-the-text" data-copy-status="id">.
// The clipboard API where the browser allows it; otherwise the text is selected for Ctrl+C.
"use strict";

(function () {
  document.querySelectorAll("button[data-copy]").forEach((button) => {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      const status = document.getElementById(button.dataset.copyStatus);
      try {
        await navigator.clipboard.writeText(source.textContent.trim());
        status.textContent = "Copied to the clipboard.";
      } catch (err) {
        const range = document.createRange();
        range.selectNodeContents(source);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        status.textContent = "Selected: press Ctrl+C (or Cmd+C) to copy it.";
      }
    });
  });
})();
