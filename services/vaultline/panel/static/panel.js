// The agent panel's page script: no framework, no build step, no third party.
// It never receives a card digit: the server sends field states, digit counts and, on
// completion, the brand, last four and token. Nothing is written to browser storage.
"use strict";

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);

  const FIELDS = {
    "card-number": "Card number",
    "expiration-date": "Expiry date",
    "security-code": "Security code",
    "postal-code": "Postal code",
  };
  const BRANDS = {
    VISA: "Visa", MASTERCARD: "Mastercard", AMEX: "American Express", DISCOVER: "Discover",
    JCB: "JCB", DINERS: "Diners Club", UNIONPAY: "UnionPay", MAESTRO: "Maestro",
  };
  const OUTCOMES = {
    "valid": "Valid",
    "invalid-card-number": "Not a valid card number",
    "invalid-card-type": "This card type is not accepted",
    "invalid-date": "Not a valid expiry date, or the card has expired",
    "invalid-security-code": "Not a valid security code",
    "invalid-postal-code": "Not a valid postal code",
    "input-timeout": "Nothing was keyed in time",
  };
  // Why a capture ended without a card: a title and what the agent can do next.
  const ENDINGS = {
    "caller-hung-up": ["The customer hung up",
      "The call ended before the card was complete. Nothing was saved."],
    "caller-pressed-star": ["The customer stopped",
      "The customer pressed star to stop keying. Nothing was saved; you can start again."],
    "agent-cancelled": ["Card capture cancelled", "Nothing was saved."],
    "too-many-failed-attempts": ["The card was not accepted",
      "The customer could not key a valid card after several attempts. Nothing was saved."],
    "connector-error": ["The card was refused",
      "The card could not be saved. Ask the customer for another card."],
    "tokenizer-unavailable": ["The card vault is unavailable",
      "The card could not be saved right now. Try again in a moment."],
    "twilio-unavailable": ["Twilio is unreachable",
      "The phone system could not be reached. Try again in a moment."],
    "twilio-internal-error": ["The phone system had a problem",
      "Twilio could not take the card. Try again."],
    "validation-error": ["The phone system refused the request",
      "Twilio could not start the card capture. Try again, or contact support."],
    "ivr-unavailable": ["The payment line is unavailable",
      "No payment line took the request in time. Try again in a moment."],
    "call-not-in-progress": ["The call is not connected",
      "The customer's call is not in progress."],
  };

  let lastSeq = 0;
  let source = null;
  let asked = { "security-code": true, "postal-code": false };

  function show(id) {
    for (const section of ["start", "capture", "result", "failure"]) {
      $(section).hidden = section !== id;
    }
  }

  function announce(text) {
    const live = $("live");
    live.textContent = "";
    window.setTimeout(() => { live.textContent = text; }, 50);
  }

  function problem(text) {
    const p = $("problem");
    p.textContent = text || "";
    p.hidden = !text;
  }

  function row(field) {
    return document.querySelector(`.fields li[data-field="${field}"]`);
  }

  function setRow(field, status, cls, digits) {
    const li = row(field);
    if (!li) return;
    li.classList.remove("valid", "invalid", "active");
    if (cls) li.classList.add(cls);
    li.querySelector(".status").textContent = status;
    li.querySelector(".dots").textContent = "\u2022".repeat(Math.min(digits || 0, 19));
  }

  function resetRows(capture) {
    asked = { "security-code": !!capture.security_code, "postal-code": !!capture.postal_code };
    for (const field of Object.keys(FIELDS)) {
      const li = row(field);
      li.hidden = field in asked && !asked[field];
      setRow(field, "Waiting", "", 0);
      li.querySelector(".again").disabled = true;
    }
  }

  function setAgainButtons(enabled) {
    for (const button of document.querySelectorAll(".fields .again")) {
      button.disabled = !enabled;
    }
  }

  function describe(event) {
    const name = FIELDS[event.field] || "";
    if (event.outcome) {
      const words = OUTCOMES[event.outcome] || "Not valid";
      if (event.outcome === "valid") return [`${name}: valid`, "Valid", "valid"];
      const attempt = event.attempt ? ` (attempt ${event.attempt})` : "";
      return [`${name}: ${words}${attempt}`, `${words}${attempt}`, "invalid"];
    }
    const again = event.attempt > 1 ? ` (attempt ${event.attempt})` : "";
    if (event.digits) {
      const n = event.digits === 1 ? "1 digit" : `${event.digits} digits`;
      return [`${name}: ${n}${again}`, `Keying: ${n}${again}`, "active"];
    }
    return [`Asking for the ${name.toLowerCase()}${again}`, `Asking the customer${again}`,
      "active"];
  }

  function handle(event) {
    if (event.seq <= lastSeq) return; // a resumed stream never repeats an event
    lastSeq = event.seq;
    $("capture").dataset.seqs = ($("capture").dataset.seqs || "") + event.seq + ",";
    if (event.state === "completed") return completed(event.card || {});
    if (event.state === "failed" || event.state === "cancelled") return ended(event.reason);
    show("capture");
    setAgainButtons(event.state === "capturing");
    if (!event.field) return;
    const [spoken, status, cls] = describe(event);
    setRow(event.field, status, cls, event.outcome ? 0 : event.digits);
    // Every outcome and the first digit of a field are read out; each digit would be noise.
    if (event.outcome || event.digits <= 1) announce(spoken);
  }

  function completed(card) {
    stopWatching();
    const brand = BRANDS[card.brand] || "Card";
    $("card-summary").textContent = `${brand} ending ${card.last4 || ""}`;
    $("token").textContent = card.token || "";
    $("copied").hidden = true;
    show("result");
    $("result-title").focus();
    announce(`Card captured: ${brand} ending ${card.last4 || ""}`);
  }

  function ended(reason) {
    stopWatching();
    const key = (reason || "").split(":")[0];
    const [title, words] = ENDINGS[key] || ["The card was not taken",
      "The card capture ended without a card. Nothing was saved."];
    $("failure-title").textContent = title;
    $("failure-words").textContent = words;
    show("failure");
    $("failure-title").focus();
    announce(`${title}. ${words}`);
  }

  function stopWatching() {
    if (source) source.close();
    source = null;
    $("connection").hidden = true;
  }

  function watch() {
    stopWatching();
    source = new EventSource("/panel/api/events");
    source.addEventListener("capture", (e) => {
      $("connection").hidden = true;
      handle(JSON.parse(e.data));
    });
    source.addEventListener("end", () => stopWatching());
    source.addEventListener("problem", (e) => problem(JSON.parse(e.data).message));
    // The browser reconnects on its own, sending the last event id: nothing is lost.
    source.onerror = () => { if (source) $("connection").hidden = false; };
  }

  async function post(path, body) {
    problem("");
    let response;
    try {
      response = await fetch(path, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body || {}),
      });
    } catch (err) {
      problem("The panel could not be reached. Check the connection and try again.");
      return null;
    }
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      problem(answer.message || "Something went wrong. Try again.");
      return null;
    }
    return answer;
  }

  function newRequestId() {
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function take() {
    const button = $("take");
    button.disabled = true;
    const answer = await post("/panel/api/capture", {
      request: newRequestId(),
      security_code: $("ask-security-code").checked,
      postal_code: $("ask-postal-code").checked,
    });
    button.disabled = false;
    if (!answer) return;
    begin(answer.capture);
  }

  function begin(capture) {
    lastSeq = 0;
    $("capture").dataset.seqs = "";
    resetRows(capture);
    show("capture");
    announce("Card capture started. The customer is asked for the card number.");
    watch();
  }

  async function again(field) {
    const answer = await post("/panel/api/capture/restart", { field });
    if (answer) announce(`Asking the customer for the ${FIELDS[field].toLowerCase()} again`);
  }

  async function copyToken() {
    const token = $("token").textContent;
    try {
      await navigator.clipboard.writeText(token);
    } catch (err) {
      const range = document.createRange();
      range.selectNodeContents($("token"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      document.execCommand("copy");
    }
    $("copied").hidden = false;
    announce("Token copied");
  }

  function restartPanel() {
    problem("");
    show("start");
    $("take").focus();
  }

  async function load() {
    const response = await fetch("/panel/api/state", { credentials: "same-origin" });
    const state = await response.json().catch(() => ({}));
    if (!response.ok) {
      problem(state.message || "Open the card panel again from the CRM.");
      $("take").disabled = true;
      return;
    }
    const capture = state.capture;
    if (!capture) return show("start");
    if (capture.state === "completed") return completed(capture.card || {});
    if (capture.state === "failed" || capture.state === "cancelled") return ended(capture.reason);
    // A capture in progress (the page was reloaded): replay its events from the start.
    resetRows(capture);
    show("capture");
    lastSeq = 0;
    watch();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("take").addEventListener("click", take);
    $("cancel").addEventListener("click", () => post("/panel/api/capture/cancel"));
    $("copy").addEventListener("click", copyToken);
    $("another").addEventListener("click", restartPanel);
    $("retry").addEventListener("click", restartPanel);
    for (const li of document.querySelectorAll(".fields li")) {
      li.querySelector(".again").addEventListener("click", () => again(li.dataset.field));
    }
    load();
  });
})();
