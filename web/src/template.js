// Canvas templates in token ids (dgport/canvas_template.py's Layout): fixed tokens, holes the model fills.

export class TemplateError extends Error {}

export const MAX_HOLE = 1 << 16;
export const MAX_POSITIONS = 1 << 20;

/** A hole of up to n positions. */
export function hole(n) {
  if (!Number.isInteger(n) || n < 1 || n > MAX_HOLE) throw new TemplateError(`a hole has 1 to ${MAX_HOLE} positions (got ${n})`);
  return { hole: n };
}

/** The template `parts` (strings fixed, {hole: n} filled) in token ids; each text part tokenized on its own. */
export function layout(parts, tokenizer) {
  if (!Array.isArray(parts) || parts.length === 0) throw new TemplateError("a template is a non-empty list of strings and {hole: N} parts");
  const ids = [];
  const fixed = [];
  const holes = [];
  parts.forEach((p, i) => {
    if (typeof p === "string") {
      const t = p ? tokenizer.encode(p) : [];
      ids.push(...t);
      t.forEach(() => fixed.push(1));
    } else if (p && typeof p === "object" && Object.keys(p).length === 1 && Number.isInteger(p.hole)) {
      hole(p.hole);
      holes.push([ids.length, p.hole]);
      for (let k = 0; k < p.hole; k++) {
        ids.push(-1);
        fixed.push(0);
      }
    } else {
      throw new TemplateError(`template part ${i}: a part is a string or {hole: N} with N a positive integer`);
    }
    if (ids.length > MAX_POSITIONS) throw new TemplateError(`the template is longer than ${MAX_POSITIONS} positions`);
  });
  if (!ids.length) throw new TemplateError("the template's text parts tokenize to nothing; give some text or a hole");
  return new Layout(Int32Array.from(ids), Uint8Array.from(fixed), holes);
}

export class Layout {
  constructor(ids, fixed, holes) {
    this.ids = ids;
    this.fixed = fixed;
    this.holes = holes;
  }

  get length() {
    return this.ids.length;
  }

  canvases(C) {
    return Math.ceil(this.length / C);
  }

  /** max_new_tokens with this template: whole canvases covering it; a smaller budget is refused. */
  checkBudget(C, maxNewTokens) {
    if (maxNewTokens != null && maxNewTokens < this.length) {
      throw new TemplateError(`the template needs ${this.length} positions (${this.canvases(C)} canvases of ${C}), more than max_new_tokens ${maxNewTokens}; raise max_new_tokens or leave it unset`);
    }
    return this.canvases(C) * C;
  }

  /** Canvas k's fixed ids and which positions are fixed: the template, then the first EOS id and PAD. */
  canvas(k, C, eosId, padId) {
    const ids = new Int32Array(C).fill(padId);
    const fixed = new Uint8Array(C).fill(1);
    const start = k * C;
    const n = Math.min(start + C, this.length) - start;
    ids.set(this.ids.subarray(start, start + n));
    fixed.set(this.fixed.subarray(start, start + n));
    if (n < C) ids[n] = eosId;
    return [ids, fixed];
  }

  /** The committed canvas: fixed positions keep their token; PAD or EOS written in a hole become PAD. */
  commit(argmax, fixedIds, fixed, eosIds, padId) {
    return Int32Array.from(argmax, (t, i) => {
      if (fixed[i]) return fixedIds[i];
      return t === padId || eosIds.includes(t) ? padId : t;
    });
  }

  holeIds(tokenIds, padId) {
    return this.holes.map(([s, n]) => tokenIds.slice(s, s + n).filter((t) => t !== padId));
  }
}
