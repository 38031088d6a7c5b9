// CSV text the way pneumoseg.safe_text writes it (a test runs both on one table of cases).
// A cell that a spreadsheet would read as a formula (it starts with = + - @, a tab or a carriage
// return, and is not a plain number such as the empty-mask RLE "-1") gets a leading ' so that it
// is shown, never evaluated; every cell is quoted, so that a comma, a quote or a line break in a
// value cannot start a new cell or row.
"use strict";

const FORMULA_START = ["=", "+", "-", "@", "\t", "\r"];
// ASCII digits only, like the Python side
const PLAIN_NUMBER = /^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$/;

function neutralise(text) {
  if (FORMULA_START.some((c) => text.startsWith(c)) && !PLAIN_NUMBER.test(text)) return "'" + text;
  return text;
}

function csvCell(value) {
  const text = neutralise(value === null || value === undefined ? "" : String(value));
  return '"' + text.replace(/"/g, '""') + '"';
}

function csvText(header, rows) {
  // header and rows: arrays of cells; one line each, "\n" after every line
  return [header, ...rows].map((r) => r.map(csvCell).join(",")).join("\n") + "\n";
}

if (typeof module !== "undefined") module.exports = { neutralise, csvCell, csvText };  // tests (Node)
