// Token ids and the chat template: Hugging Face's tokenizers.js for ids, @huggingface/jinja for the
// checkpoint's own template (dgport/tokenizer.py's ChatTokenizer).

import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";

export class ChatTokenizer {
  /** tokenizerJson, tokenizerConfig: the export's tokenizer.json and tokenizer_config.json, parsed. */
  constructor(tokenizerJson, tokenizerConfig = {}) {
    if (!tokenizerConfig || typeof tokenizerConfig !== "object" || Array.isArray(tokenizerConfig)) {
      throw new Error("tokenizer_config.json: not a JSON object; export again");
    }
    this.tok = new Tokenizer(tokenizerJson, tokenizerConfig);
    const template = tokenizerConfig.chat_template;
    if (template != null && typeof template !== "string") {
      throw new Error("tokenizer_config.json: chat_template is not a string (named templates are not supported)");
    }
    this.chatTemplate = template ?? null;
    let bos = tokenizerConfig.bos_token || "<bos>";
    if (typeof bos === "object") bos = bos.content ?? "<bos>";
    this.bosToken = bos;
    this.bosId = this.tok.token_to_id(bos) ?? null;
    this.compiled = null;
  }

  /** The chat template rendered over `messages` (what the model was trained to read). */
  render(messages, { addGenerationPrompt = true, enableThinking = false } = {}) {
    if (!this.chatTemplate) throw new Error("this model has no chat template; pass raw: true to send the prompt as is");
    if (this.compiled === null) this.compiled = new Template(this.chatTemplate);
    return this.compiled.render({ messages, add_generation_prompt: addGenerationPrompt,
                                  enable_thinking: enableThinking, bos_token: this.bosToken });
  }

  /** Ids of text that already carries its special tokens (e.g. a rendered chat). */
  encode(text) {
    return this.tok.encode(text, { add_special_tokens: false }).ids;
  }

  /** A raw prompt: its ids with <bos> in front. */
  encodeRaw(text) {
    const ids = this.encode(text);
    if (this.bosId !== null && (ids.length === 0 || ids[0] !== this.bosId)) ids.unshift(this.bosId);
    return ids;
  }

  decode(ids, { skipSpecialTokens = true } = {}) {
    return this.tok.decode(Array.from(ids), { skip_special_tokens: skipSpecialTokens });
  }
}
