// "Copy" buttons of the account pages: <button data-copy="ID" hidden> copies the text of the
// element with that id. The buttons stay hidden where the clipboard cannot be used (no script,
// or a page not served over https or from localhost): the text can still be selected by hand.
document.addEventListener("DOMContentLoaded", () => {
  if (!navigator.clipboard) return;
  for (const button of document.querySelectorAll("button[data-copy]")) {
    const source = document.getElementById(button.dataset.copy);
    if (!source) continue;
    const status = document.getElementById(button.dataset.copy + "-copied");
    button.hidden = false;
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(source.textContent.trim());
        if (status) status.textContent = "Copied.";
      } catch (error) {
        if (status) status.textContent = "Could not copy: select the text and copy it by hand.";
      }
    });
  }
});
