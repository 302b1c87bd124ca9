// A small markdown renderer for model replies.
//
// Safety: the model's text never becomes markup. Nothing here builds an HTML
// string or assigns innerHTML; every piece of text ends up in a text node
// (createTextNode / textContent), which the browser never parses, so
// `<script>` or `<img onerror=...>` in a reply is shown as those characters.
// Elements are only ever the fixed set named below. Links are made only for
// http: and https: URLs (no javascript:, data:, ...), and open with
// rel="noopener noreferrer".
//
// Supported: ``` and ~~~ code fences (an unclosed fence, as while streaming,
// runs to the end), `inline code`, **bold** / __bold__, *italic* / _italic_,
// # headings, - * + and 1. lists, > quotes, --- rules, [text](http://link).
'use strict';

(function () {
  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const ITEM = /^\s{0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

  function el(tag, text) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // Block structure, line by line; each block's text goes through inline().
  function render(source) {
    const out = document.createDocumentFragment();
    const lines = String(source).replace(/\r\n?/g, '\n').split('\n');
    let para = [];
    let list = null;
    const flushPara = () => {
      if (para.length) {
        const p = el('p');
        p.appendChild(inline(para.join('\n')));
        out.appendChild(p);
        para = [];
      }
    };
    const flushList = () => { list = null; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        flushPara(); flushList();
        const marker = fence[1];
        // Closed by a line of the same character, at least as long.
        const closes = (l) => { const t = l.trim(); return t.length >= marker.length && t === marker[0].repeat(t.length); };
        const body = [];
        i++;
        while (i < lines.length && !closes(lines[i])) {
          body.push(lines[i]);
          i++;
        }
        const pre = el('pre');
        const code = el('code', body.join('\n'));
        if (fence[2]) code.dataset.lang = fence[2];
        pre.appendChild(code);
        out.appendChild(pre);
        continue;
      }
      if (line.trim() === '') { flushPara(); flushList(); continue; }
      const heading = HEADING.exec(line);
      if (heading) {
        flushPara(); flushList();
        const h = el('h' + heading[1].length);
        h.appendChild(inline(heading[2]));
        out.appendChild(h);
        continue;
      }
      if (RULE.test(line)) { flushPara(); flushList(); out.appendChild(el('hr')); continue; }
      const item = ITEM.exec(line);
      if (item) {
        flushPara();
        const ordered = /\d/.test(item[1][0]);
        if (!list || (list.tagName === 'OL') !== ordered) {
          list = el(ordered ? 'ol' : 'ul');
          if (ordered && parseInt(item[1], 10) !== 1) list.start = parseInt(item[1], 10);
          out.appendChild(list);
        }
        const li = el('li');
        li.appendChild(inline(item[2]));
        list.appendChild(li);
        continue;
      }
      const quote = QUOTE.exec(line);
      if (quote) {
        flushPara(); flushList();
        const q = el('blockquote');
        q.appendChild(inline(quote[1]));
        out.appendChild(q);
        continue;
      }
      // A line indented under a list item continues it.
      if (list && /^\s+\S/.test(line)) {
        list.lastChild.appendChild(document.createTextNode('\n'));
        list.lastChild.appendChild(inline(line.trim()));
        continue;
      }
      flushList();
      para.push(line);
    }
    flushPara();
    return out;
  }

  // A link target we allow: an absolute http(s) URL, as the URL parser reads it.
  function safeUrl(text) {
    try {
      const u = new URL(text);
      return u.protocol === 'http:' || u.protocol === 'https:' ? u.href : null;
    } catch (_) {
      return null;
    }
  }

  // Inline spans, left to right; anything not a complete span stays text.
  function inline(s) {
    const out = document.createDocumentFragment();
    let text = '';
    const flush = () => { if (text) { out.appendChild(document.createTextNode(text)); text = ''; } };
    let i = 0;
    while (i < s.length) {
      const c = s[i];
      if (c === '`') {
        let n = 1;
        while (s[i + n] === '`') n++;
        const ticks = '`'.repeat(n);
        const end = s.indexOf(ticks, i + n);
        if (end > i + n) {
          flush();
          out.appendChild(el('code', s.slice(i + n, end)));
          i = end + n;
          continue;
        }
        text += ticks;
        i += n;
        continue;
      }
      if ((c === '*' || c === '_') && s[i + 1] === c) {
        const end = s.indexOf(c + c, i + 2);
        if (end > i + 2 && s[i + 2] !== ' ') {
          flush();
          const b = el('strong');
          b.appendChild(inline(s.slice(i + 2, end)));
          out.appendChild(b);
          i = end + 2;
          continue;
        }
      } else if (c === '*' || (c === '_' && !/\w/.test(s[i - 1] || ''))) {
        const end = s.indexOf(c, i + 1);
        const inner = s.slice(i + 1, end);
        // snake_case stays text: a closing _ must not sit inside a word.
        const closes = end > i + 1 && inner[0] !== ' ' && !(c === '_' && /\w/.test(s[end + 1] || ''));
        if (closes) {
          flush();
          const em = el('em');
          em.appendChild(inline(inner));
          out.appendChild(em);
          i = end + 1;
          continue;
        }
      } else if (c === '[') {
        const m = /^\[([^\]\n]+)\]\(([^)\s]+)\)/.exec(s.slice(i));
        const href = m && safeUrl(m[2]);
        if (href) {
          flush();
          const a = el('a', m[1]);
          a.href = href;
          a.rel = 'noopener noreferrer';
          a.target = '_blank';
          out.appendChild(a);
          i += m[0].length;
          continue;
        }
      }
      text += c;
      i++;
    }
    flush();
    return out;
  }

  window.FerryMarkdown = Object.freeze({ render });
})();
