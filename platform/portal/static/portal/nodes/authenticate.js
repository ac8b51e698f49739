// 3-D Secure for a node's first payment (portal.views.nodes.node_deploy): Stripe.js shows the
// bank's confirmation; then the form posts to our server, which re-reads the invoice from
// Stripe (never the browser's word) and shows the node's page.
"use strict";

(function () {
  const form = document.getElementById("authenticate");
  const status = document.getElementById("authenticate-status");
  if (!form) {
    return;
  }
  let confirmed = false;
  form.addEventListener("submit", async (event) => {
    if (confirmed) {
      return;
    }
    event.preventDefault();
    if (typeof Stripe === "undefined") {
      status.textContent = "Stripe.js could not be loaded. Check your connection and reload the page.";
      return;
    }
    status.textContent = "Waiting for your bank's confirmation…";
    const stripe = Stripe(form.dataset.publishableKey);
    const result = await stripe.confirmCardPayment(form.dataset.clientSecret);
    if (result.error) {
      status.textContent = `The payment was not confirmed: ${result.error.message} Nothing was provisioned; try again or use another card.`;
      return;
    }
    confirmed = true;
    status.textContent = "Payment confirmed. Starting the node…";
    form.submit();
  });
})();
