// uploads-consumer console: optional. Every page works without this file; with it, the overview follows
// by itself and a dead-letter list can be selected at once. No data from a page is ever written as markup
// here except the overview's rows, which the console itself rendered (escaped) for that purpose.
(function () {
  "use strict";

  function follow(body) {
    var url = body.getAttribute("data-refresh");
    var seconds = parseFloat(body.getAttribute("data-seconds")) || 5;
    function again() {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var rows = new DOMParser().parseFromString("<table><tbody>" + html + "</tbody></table>", "text/html");
          body.replaceChildren.apply(body, Array.prototype.slice.call(rows.querySelector("tbody").children));
          var when = document.getElementById("refreshed");
          if (when) { when.textContent = new Date().toISOString().replace(/\.\d+Z$/, "Z"); }
        })
        .catch(function () { /* the next turn tries again */ })
        .then(function () { setTimeout(again, seconds * 1000); });
    }
    setTimeout(again, seconds * 1000);
  }

  function selectAll(box) {
    box.hidden = false;
    box.addEventListener("change", function () {
      var boxes = document.querySelectorAll("#replay-form input[name=seq]");
      for (var i = 0; i < boxes.length; i++) { boxes[i].checked = box.checked; }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var body = document.querySelector("[data-refresh]");
    if (body) { follow(body); }
    var box = document.getElementById("select-all");
    if (box) { selectAll(box); }
  });
})();
