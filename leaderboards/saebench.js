(function () {
  // Sort a table by the clicked column: numbers as numbers ("0.97 ± 0.01" sorts by 0.97), text as text,
  // missing values ("—" or empty) always last; a second click reverses the order.
  function key(cell) {
    var text = cell.textContent.trim();
    if (text === "" || text === "\u2014") return null;
    var number = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?/.exec(text);
    return number ? parseFloat(number[0]) : text.toLowerCase();
  }
  function sortBy(table, column, header) {
    var body = table.tBodies[0];
    var descending = header.getAttribute("aria-sort") === "ascending";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[column]), y = key(b.cells[column]);
      if (x === null || y === null) return (x === null) - (y === null);
      if (typeof x !== typeof y) { x = String(x); y = String(y); }
      var order = x < y ? -1 : x > y ? 1 : 0;
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  document.querySelectorAll("table").forEach(function (table) {
    if (!table.tHead || !table.tBodies.length) return;
    var first = table.tBodies[0].rows[0];
    Array.prototype.forEach.call(first ? first.cells : [], function (cell, column) {
      if (typeof key(cell) !== "string") return;  // a text column (encoder, hookpoint): left-aligned
      Array.prototype.forEach.call(table.rows, function (row) {
        if (row.cells[column]) row.cells[column].classList.add("text");
      });
    });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      th.title = "click to sort";
      th.addEventListener("click", function () { sortBy(table, column, th); });
    });
    var wrap = document.createElement("div");
    wrap.className = "table-wrap";
    table.parentNode.insertBefore(wrap, table);
    wrap.appendChild(table);
  });
})();
