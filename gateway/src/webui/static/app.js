// ferry's chat page: a conversation streamed from /v1/chat/completions.
//
// The page is a client of the API like any other: it reads the model from
// /v1/models and streams replies with fetch, reading the SSE body itself (an
// EventSource cannot POST or send a key). The API key, when the server wants
// one, is asked for on the first 401 and kept in sessionStorage: it lives as
// long as this tab and is sent only to this origin, as `Authorization: Bearer`.
// Model text reaches the page only through FerryMarkdown.render, which makes
// text nodes (see markdown.js).
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = 'ferry.apiKey';
  const CHAT_URL = new URL('/v1/chat/completions', location.href).href;
  const MODELS_URL = new URL('/v1/models', location.href).href;

  const ui = {
    log: $('log'), input: $('input'), send: $('send'), stop: $('stop'), composer: $('composer'),
    model: $('model'), settings: $('settings'), settingsToggle: $('settings-toggle'), newChat: $('new-chat'),
    system: $('system'), temperature: $('temperature'), topP: $('top-p'), maxTokens: $('max-tokens'), seed: $('seed'),
    keyForm: $('key-form'), keyInput: $('api-key'), keyMessage: $('key-message'), forgetKey: $('forget-key'),
  };

  const state = {
    messages: [], // the conversation sent with each request: {role, content}
    model: null, // the served model's id, from /v1/models
    controller: null, // the AbortController of the reply being streamed
    pending: null, // a message held back until the user gives a key
    chat: 0, // counts New chats: a reply stopped by one must not join the next
  };

  // Many replies in one tab: keep room for their timing entries, which is
  // how the page learns the protocol the browser used.
  if (performance.setResourceTimingBufferSize) performance.setResourceTimingBufferSize(1000);

  function apiHeaders() {
    const h = { 'Content-Type': 'application/json' };
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) h.Authorization = 'Bearer ' + key;
    return h;
  }

  function askForKey(message) {
    ui.keyMessage.textContent = message;
    ui.keyForm.hidden = false;
    ui.keyInput.focus();
  }

  async function loadModel() {
    try {
      const r = await fetch(MODELS_URL, { headers: apiHeaders() });
      if (r.status === 401) {
        askForKey(sessionStorage.getItem(KEY_STORE) ? 'That API key was refused; enter another.' : 'This server needs an API key.');
        ui.model.textContent = 'API key needed';
        return;
      }
      if (!r.ok) throw new Error('HTTP ' + r.status);
      const m = (await r.json()).data[0];
      state.model = m.id;
      ui.model.textContent = m.max_model_len ? `${m.id} · ${m.max_model_len} tokens of context` : m.id;
      ui.model.dataset.maxModelLen = m.max_model_len || '';
    } catch (e) {
      ui.model.textContent = 'model unknown (' + e.message + ')';
    }
  }

  // One bubble in the log: the user's text as typed, the reply as markdown.
  function addBubble(role, text) {
    const div = document.createElement('div');
    div.className = 'msg ' + role;
    const body = document.createElement('div');
    body.className = 'body';
    div.appendChild(body);
    ui.log.appendChild(div);
    setText(div, text);
    return div;
  }

  // The raw text sits in data-raw (an attribute, never parsed) for copying and tests.
  function setText(bubble, text) {
    bubble.dataset.raw = text;
    const body = bubble.querySelector('.body');
    if (bubble.classList.contains('assistant')) {
      body.replaceChildren(window.FerryMarkdown.render(text));
    } else {
      body.textContent = text;
    }
  }

  // What each figure under a reply is (shown as its tooltip).
  const STAT_TITLES = {
    ttft: 'time to first token',
    rate: 'tokens per second after the first token',
    usage: 'prompt + completion = total tokens',
    finish: 'why the reply ended',
    protocol: 'the HTTP version the browser used for this reply',
  };

  function setStats(bubble, parts, cls) {
    let stats = bubble.querySelector('.stats');
    if (!stats) {
      stats = document.createElement('div');
      stats.className = 'stats';
      bubble.appendChild(stats);
    }
    stats.replaceChildren(...parts.map(([name, value]) => {
      const s = document.createElement('span');
      s.dataset.stat = name;
      s.textContent = value;
      if (STAT_TITLES[name]) s.title = STAT_TITLES[name];
      return s;
    }));
    if (cls) stats.classList.add(cls);
  }

  function scrollDown() {
    ui.log.scrollTop = ui.log.scrollHeight;
  }

  function busy(on) {
    ui.send.hidden = on;
    ui.stop.hidden = !on;
    document.body.classList.toggle('busy', on);
  }

  function number(input, parse) {
    const v = input.value.trim();
    if (v === '') return undefined;
    const n = parse(v);
    return Number.isFinite(n) ? n : undefined;
  }

  function requestBody() {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: 'system', content: system });
    messages.push(...state.messages);
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (state.model) body.model = state.model;
    const settings = {
      temperature: number(ui.temperature, parseFloat),
      top_p: number(ui.topP, parseFloat),
      max_tokens: number(ui.maxTokens, (v) => parseInt(v, 10)),
      seed: number(ui.seed, (v) => parseInt(v, 10)),
    };
    for (const [k, v] of Object.entries(settings)) if (v !== undefined) body[k] = v;
    return body;
  }

  // Splits what arrived into whole SSE events and the unfinished rest.
  function takeEvents(buffer) {
    const parts = buffer.split(/\r?\n\r?\n/);
    const rest = parts.pop();
    const events = parts.map((ev) => ev.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n')).filter((d) => d !== '');
    return [events, rest];
  }

  // The protocol the browser used for this request, as it reports it
  // (h3, h2, http/1.1); the entry appears once the body has been read.
  async function protocolOf(url) {
    for (let i = 0; i < 20; i++) {
      const entries = performance.getEntriesByName(url, 'resource');
      if (entries.length) {
        const p = entries[entries.length - 1].nextHopProtocol;
        performance.clearResourceTimings();
        return p || 'unknown';
      }
      await new Promise((r) => setTimeout(r, 25));
    }
    return 'unknown';
  }

  async function errorMessage(r) {
    try {
      const j = await r.json();
      return (j.error && j.error.message) || JSON.stringify(j);
    } catch (_) {
      return 'HTTP ' + r.status;
    }
  }

  async function send(text) {
    const chat = state.chat;
    state.messages.push({ role: 'user', content: text });
    const userBubble = addBubble('user', text);
    const bubble = addBubble('assistant', '');
    bubble.classList.add('streaming');
    scrollDown();
    const controller = new AbortController();
    state.controller = controller;
    busy(true);
    const t0 = performance.now();
    let first = null;
    let reply = '';
    let usage = null;
    let finish = null;
    let failure = null;
    let frame = 0;
    const paint = () => {
      frame = 0;
      setText(bubble, reply);
      scrollDown();
    };
    try {
      const r = await fetch(CHAT_URL, { method: 'POST', headers: apiHeaders(), body: JSON.stringify(requestBody()), signal: controller.signal });
      if (r.status === 401) {
        // Not an answer: take the message back and send it again once there is a key.
        state.messages.pop();
        userBubble.remove();
        bubble.remove();
        state.pending = text;
        askForKey(sessionStorage.getItem(KEY_STORE) ? 'That API key was refused; enter another.' : 'This server needs an API key.');
        return;
      }
      if (!r.ok) throw new Error(await errorMessage(r));
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let done = false;
      while (!done) {
        const chunk = await reader.read();
        if (chunk.done) break;
        let events;
        [events, buffer] = takeEvents(buffer + chunk.value);
        for (const data of events) {
          if (data === '[DONE]') { done = true; break; }
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || 'error');
          if (j.usage) usage = j.usage;
          const choice = j.choices && j.choices[0];
          if (!choice) continue;
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            if (first === null) first = performance.now();
            reply += piece;
            if (!frame) frame = requestAnimationFrame(paint);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (e) {
      if (e.name === 'AbortError') finish = 'stopped';
      else failure = e.message || String(e);
    } finally {
      if (frame) cancelAnimationFrame(frame);
      if (state.controller === controller) state.controller = null;
      busy(false);
    }
    if (chat !== state.chat) return; // New chat was pressed: this reply is gone
    bubble.classList.remove('streaming');
    setText(bubble, reply);
    if (failure !== null) {
      bubble.classList.add('error');
      setStats(bubble, [['error', 'Error: ' + failure]], 'error');
      // A failed turn is not sent again with the next message.
      state.messages.pop();
      return;
    }
    // A stopped reply stays in the conversation as far as it got.
    state.messages.push({ role: 'assistant', content: reply });
    const end = performance.now();
    const stats = [];
    stats.push(['ttft', first === null ? 'no tokens' : `first token ${Math.round(first - t0)} ms`]);
    if (usage && first !== null && end > first) {
      // The first token's time is TTFT's; the rest came at this rate.
      const rate = Math.max(usage.completion_tokens - 1, 0) / ((end - first) / 1000);
      stats.push(['rate', `${rate.toFixed(1)} tokens/s`]);
    }
    if (usage) stats.push(['usage', `${usage.prompt_tokens} + ${usage.completion_tokens} = ${usage.total_tokens} tokens`]);
    if (finish) stats.push(['finish', finish]);
    stats.push(['protocol', await protocolOf(CHAT_URL)]);
    setStats(bubble, stats);
    bubble.dataset.finish = finish || '';
    scrollDown();
  }

  function submit() {
    if (state.controller) return; // one reply at a time
    const text = ui.input.value;
    if (!text.trim()) return;
    ui.input.value = '';
    send(text);
  }

  ui.composer.addEventListener('submit', (e) => { e.preventDefault(); submit(); });
  ui.input.addEventListener('keydown', (e) => {
    // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition is neither.
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  ui.stop.addEventListener('click', () => { if (state.controller) state.controller.abort(); });
  ui.newChat.addEventListener('click', () => {
    state.chat++;
    if (state.controller) state.controller.abort();
    state.messages = [];
    ui.log.replaceChildren();
    ui.input.focus();
  });
  ui.settingsToggle.addEventListener('click', () => {
    ui.settings.hidden = !ui.settings.hidden;
    ui.settingsToggle.setAttribute('aria-expanded', String(!ui.settings.hidden));
  });
  ui.keyForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const key = ui.keyInput.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    ui.keyInput.value = '';
    ui.keyForm.hidden = true;
    loadModel().then(() => {
      const text = state.pending;
      state.pending = null;
      if (text !== null && !state.controller) send(text);
    });
  });
  ui.forgetKey.addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORE);
    loadModel();
  });

  loadModel();
  ui.input.focus();
})();
