// Small DOM helpers. Text from the server is always set as text, never parsed as HTML.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function table(target, headers, rows, caption) {
  target.replaceChildren();
  if (caption) target.append(el("caption", { text: caption }));
  target.append(el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col", text: h })))));
  target.append(el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: c ?? "" })))))));
}

export function fmt(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : value ?? "";
}

export function showError(target, message) {
  target.hidden = !message;
  target.textContent = message || "";
}

// Markdown of the report (headings, lists, emphasis, paragraphs), built as DOM nodes.
export function renderMarkdown(target, text) {
  target.replaceChildren();
  let list = null;
  const inline = (line) => {
    const parts = line.split(/(\*\*[^*]+\*\*|\*[^*]+\*|`[^`]+`)/g).filter(Boolean);
    return parts.map((part) => {
      if (part.startsWith("**")) return el("strong", { text: part.slice(2, -2) });
      if (part.startsWith("`")) return el("code", { text: part.slice(1, -1) });
      if (part.startsWith("*") && part.length > 2) return el("em", { text: part.slice(1, -1) });
      return document.createTextNode(part);
    });
  };
  for (const raw of text.split("\n")) {
    const line = raw.trimEnd();
    const heading = line.match(/^(#{1,4})\s+(.*)$/);
    const item = line.match(/^\s*(?:[-*]|\d+\.)\s+(.*)$/);
    if (item) {
      if (!list) target.append((list = el("ul")));
      list.append(el("li", {}, inline(item[1])));
      continue;
    }
    list = null;
    if (heading) target.append(el(`h${Math.min(heading[1].length + 2, 6)}`, {}, inline(heading[2])));
    else if (line.startsWith(">")) target.append(el("blockquote", {}, inline(line.replace(/^>\s?/, ""))));
    else if (/^_.+_$/.test(line)) target.append(el("p", { class: "disclaimer" }, el("em", { text: line.slice(1, -1) })));
    else if (line) target.append(el("p", {}, inline(line)));
  }
}
