// The Sudoku task (dgport/task.py and models/sudoku/puzzles.py): the answer check and the answer template.

const DIGITS = "123456789";

/** A puzzle typed by a person -> 81 chars of 1-9/'.': separators dropped; '0', '_' and '*' mean blank. */
export function normalize(text) {
  return Array.from(text).filter((ch) => "123456789.0_*".includes(ch)).map((ch) => ("0_*".includes(ch) ? "." : ch)).join("");
}

const PEERS = Array.from({ length: 81 }, (_, i) => {
  const r = Math.floor(i / 9);
  const c = i % 9;
  const peers = new Set();
  for (let k = 0; k < 9; k++) {
    peers.add(r * 9 + k);
    peers.add(k * 9 + c);
    peers.add((Math.floor(r / 3) * 3 + Math.floor(k / 3)) * 9 + Math.floor(c / 3) * 3 + (k % 3));
  }
  peers.delete(i);
  return [...peers];
});

/** Indices of the filled cells that repeat a digit in their row, column or box. */
export function conflicts(grid) {
  return Array.from(grid).flatMap((ch, i) => (DIGITS.includes(ch) && PEERS[i].some((j) => grid[j] === ch) ? [i] : []));
}

export function isValidSolution(puzzle, answer) {
  if (answer.length !== 81 || puzzle.length !== 81 || Array.from(answer).some((ch) => !DIGITS.includes(ch))) return false;
  if (Array.from(puzzle).some((p, i) => DIGITS.includes(p) && p !== answer[i])) return false;
  return conflicts(answer).length === 0;
}

/** {ok, summary}: the answer judged as dgport's `sudoku` task judges it. */
export function checkAnswer(prompt, answer) {
  const puzzle = normalize(prompt);
  const grid = answer.replace(/\s+/g, "");
  if (isValidSolution(puzzle, grid)) {
    return { task: "sudoku", ok: true, summary: `a valid solution (keeps all ${Array.from(puzzle).filter((c) => c !== ".").length} givens)` };
  }
  if (grid.length !== 81 || Array.from(grid).some((ch) => !DIGITS.includes(ch))) {
    return { task: "sudoku", ok: false, summary: `not a solution: the answer is not 81 digits 1-9 (it has ${grid.length} characters)` };
  }
  const changed = Array.from(puzzle).filter((p, i) => p !== "." && p !== grid[i]).length;
  const bad = conflicts(grid).length;
  const parts = bad ? [`${bad} of 81 cells repeat a digit in their row, column or box`] : [];
  if (changed) parts.push(`${changed} given${changed !== 1 ? "s" : ""} changed`);
  return { task: "sudoku", ok: false, summary: "not a solution: " + parts.join("; ") };
}

/** The answer template: every given fixed, a one-position hole for each blank (dgport's --task-template). */
export function answerTemplate(prompt) {
  const puzzle = normalize(prompt);
  if (puzzle.length !== 81) throw new Error("not a Sudoku puzzle: give the 81 cells row by row, digits 1-9 and . or 0 for a blank");
  return Array.from(puzzle, (ch) => (ch === "." ? { hole: 1 } : ch));
}
