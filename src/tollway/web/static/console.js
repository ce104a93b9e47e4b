// Tollway console: copy buttons, column visibility, print. Pages work without it.
"use strict";
document.addEventListener("click", (event) => {
  const copy = event.target.closest("[data-copy]");
  if (copy) {
    const text = document.querySelector(copy.dataset.copy).textContent.trim();
    const done = () => { copy.textContent = "Copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => select(copy.dataset.copy));
    } else {
      select(copy.dataset.copy);
      if (document.execCommand("copy")) done();
    }
  }
  if (event.target.closest("[data-print]")) window.print();
});
function select(selector) {
  const range = document.createRange();
  range.selectNodeContents(document.querySelector(selector));
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}
const KEY = "tollway.usage.hidden";
function applyColumns() {
  const hidden = JSON.parse(localStorage.getItem(KEY) || "[]");
  document.querySelectorAll("[data-column]").forEach((box) => {
    const off = hidden.includes(box.dataset.column);
    box.checked = !off;
    document.querySelectorAll(".col-" + box.dataset.column).forEach((cell) => {
      cell.hidden = off;
    });
  });
}
document.addEventListener("change", (event) => {
  const box = event.target.closest("[data-column]");
  if (!box) return;
  const hidden = new Set(JSON.parse(localStorage.getItem(KEY) || "[]"));
  if (box.checked) hidden.delete(box.dataset.column); else hidden.add(box.dataset.column);
  localStorage.setItem(KEY, JSON.stringify([...hidden]));
  applyColumns();
});
applyColumns();
