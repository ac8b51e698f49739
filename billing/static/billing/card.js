// The card form of /billing/card (billing/pages.py). Stripe.js collects the card and confirms a
// SetupIntent with Stripe from the browser, so the card number reaches Stripe only; our API then
// checks that SetupIntent with Stripe and makes its card the account's default. Written against
// the card element and confirmCardSetup, which both Stripe.js and localstripe's stand-in offer.
// Loaded as a file, never inline: the page's Content-Security-Policy allows no inline script.
"use strict";

(function () {
  const status = document.getElementById("card-status");
  const current = document.getElementById("current-card");
  const form = document.getElementById("card-form");

  function say(text, kind) {
    status.textContent = text;
    status.dataset.kind = kind || "info";
  }

  function describe(card) {
    if (!card) {
      return "No card yet.";
    }
    const brand = card.brand ? card.brand.charAt(0).toUpperCase() + card.brand.slice(1) : "Card";
    return `${brand} •••• ${card.last4}, expires ${card.exp}`;
  }

  // Our API, signed in by the session cookie; a POST carries the form's CSRF token. Any answer
  // but 2xx becomes an Error with the server's own words (its "detail").
  async function api(url, method, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") {
      headers["Content-Type"] = "application/json";
      headers["X-CSRFToken"] = form.elements.csrfmiddlewaretoken.value;
    }
    let response;
    try {
      response = await fetch(url, {
        method,
        headers,
        credentials: "same-origin",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new Error("The server could not be reached. Check your connection and try again.");
    }
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new Error(answer.detail || `The server answered ${response.status}. Try again later.`);
    }
    return answer;
  }

  async function showCurrentCard() {
    const billing = await api((form && form.dataset.billingUrl) || "/api/v1/billing", "GET");
    current.textContent = describe(billing.card);
  }

  if (!form) {
    // Billing is off: the page says so; the card on file (if any) is still shown.
    showCurrentCard().catch((err) => {
      current.textContent = "";
      say(err.message, "error");
    });
    return;
  }

  const button = document.getElementById("card-save");
  let stripe = null;
  let cardElement = null;
  let cardTouched = false;
  let setupIntent = null; // {id, client_secret}; a new one after each success or failure

  async function newSetupIntent() {
    setupIntent = await api(form.dataset.setupIntentUrl, "POST");
    return setupIntent;
  }

  async function start() {
    const [intent] = await Promise.all([newSetupIntent(), showCurrentCard()]);
    if (typeof Stripe === "undefined") {
      throw new Error("Stripe.js did not load. Reload the page, or try again later.");
    }
    stripe = Stripe(intent.publishable_key);
    cardElement = stripe.elements().create("card");
    cardElement.mount("#card-element");
    cardElement.on("change", (event) => {
      cardTouched = true;
      // Stripe.js says what is wrong while the card is typed; its stand-in says nothing.
      if (event && event.error) {
        say(event.error.message, "error");
      } else if (status.dataset.kind === "error") {
        say("");
      }
    });
    button.disabled = false;
  }

  async function save() {
    if (!cardTouched) {
      say("Enter your card number, expiry date and security code first.", "error");
      return;
    }
    say("Checking your card with Stripe…");
    const intent = setupIntent || (await newSetupIntent());
    // Resolves after 3-D Secure when the card asks for it (Stripe.js shows the bank's dialog).
    const result = await stripe.confirmCardSetup(intent.client_secret, {
      payment_method: { card: cardElement },
    });
    setupIntent = null; // used up: succeeded, or failed and not to be confirmed again
    if (result.error) {
      say(result.error.message || "Stripe could not check this card. Try another card.", "error");
      return;
    }
    say("Saving your card…");
    const saved = await api(form.dataset.paymentMethodUrl, "POST", {
      setup_intent: result.setupIntent.id,
    });
    current.textContent = describe(saved.card);
    say(`Card ending ${saved.card.last4} saved.`, "success");
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    button.disabled = true;
    save()
      .catch((err) => say(err.message || String(err), "error"))
      .finally(() => {
        button.disabled = false;
      });
  });

  start().catch((err) => say(`The card form could not be loaded: ${err.message}`, "error"));
})();
