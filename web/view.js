// The page's two widgets: the puzzle editor and the live canvas.

/** A 9x9 grid of one-character inputs: digits fill a cell, arrows move, Backspace/Delete/0/. clear. */
export class GridEditor {
  constructor(container) {
    container.classList.add("grid");
    this.cells = Array.from({ length: 81 }, (_, i) => {
      const cell = document.createElement("input");
      cell.inputMode = "numeric";
      cell.maxLength = 1;
      cell.setAttribute("aria-label", `row ${Math.floor(i / 9) + 1} column ${(i % 9) + 1}`);
      cell.tabIndex = i === 0 ? 0 : -1;
      cell.addEventListener("keydown", (e) => this.key(e, i));
      cell.addEventListener("input", () => { cell.value = /^[1-9]$/.test(cell.value) ? cell.value : ""; });
      container.append(cell);
      return cell;
    });
  }

  key(e, i) {
    const move = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -9, ArrowDown: 9 }[e.key];
    if (move !== undefined) {
      e.preventDefault();
      this.focus((i + move + 81) % 81);
    } else if (/^[1-9]$/.test(e.key)) {
      e.preventDefault();
      this.cells[i].value = e.key;
      this.focus(Math.min(i + 1, 80));
    } else if (["Backspace", "Delete", "0", "."].includes(e.key)) {
      e.preventDefault();
      this.cells[i].value = "";
      if (e.key !== "Delete") this.focus(e.key === "Backspace" ? Math.max(i - 1, 0) : Math.min(i + 1, 80));
    }
  }

  focus(i) {
    this.cells.forEach((c, k) => { c.tabIndex = k === i ? 0 : -1; });
    this.cells[i].focus();
  }

  get value() {
    return this.cells.map((c) => c.value || ".").join("");
  }

  set value(puzzle) {
    this.cells.forEach((c, i) => { c.value = /^[1-9]$/.test(puzzle[i] ?? "") ? puzzle[i] : ""; });
  }

  set disabled(flag) {
    this.cells.forEach((c) => { c.disabled = flag; });
  }
}

/** The canvas: one box per position (a 9x9 grid for Sudoku), styled by what the step did there. */
export class CanvasView {
  constructor(container, tokenText, sudoku) {
    this.container = container;
    this.tokenText = tokenText;
    this.sudoku = sudoku;
    container.classList.toggle("grid", sudoku);
    container.classList.toggle("tokens", !sudoku);
  }

  /** tokens: ids; kind(i): "accepted" | "renoised" | "fixed" | "committed". */
  show(tokens, kind) {
    const n = this.sudoku ? 81 : tokens.length;
    while (this.container.children.length > n) this.container.lastChild.remove();
    while (this.container.children.length < n) this.container.append(document.createElement("span"));
    for (let i = 0; i < n; i++) {
      const box = this.container.children[i];
      const text = this.tokenText(tokens[i]);
      box.textContent = this.sudoku ? (text.length === 1 ? text : "·") : visible(text);
      box.className = kind(i);
    }
  }
}

const visible = (text) => text.replace(/\n/g, "↵").replace(/\t/g, "→") || "∅";
