// aviato dashboard: follows a sandbox's main log (server-sent events) and refreshes its charts.
// Hand-written, no dependencies; the pages work without it (they are rendered on the server).
"use strict";
(function () {
  const box = document.querySelector(".sandbox[data-sandbox]");
  if (!box) return;
  const id = encodeURIComponent(box.dataset.sandbox);
  const log = document.getElementById("log");
  const state = document.getElementById("log-state");
  const MAX_CHARS = 256 * 1024; // keep the page small: drop the oldest output beyond this

  const source = new EventSource("/sandboxes/" + id + "/logs");
  state.textContent = "(following)";
  source.onmessage = function (event) {
    const record = JSON.parse(event.data);
    const span = document.createElement("span");
    if (record.stream === 2) span.className = "stderr";
    span.textContent = record.text;
    log.appendChild(span);
    while (log.textContent.length > MAX_CHARS && log.firstChild) log.removeChild(log.firstChild);
    log.scrollTop = log.scrollHeight;
  };
  source.addEventListener("end", function () {
    state.textContent = "(the sandbox ended)";
    source.close();
  });
  source.onerror = function () {
    if (source.readyState === EventSource.CLOSED) state.textContent = "(closed)";
  };

  if (box.dataset.live !== "1") return;
  const charts = document.getElementById("charts");
  setInterval(function () {
    fetch("/sandboxes/" + id + "/charts", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html !== null) charts.innerHTML = html; })
      .catch(function () {});
  }, 5000);
})();
