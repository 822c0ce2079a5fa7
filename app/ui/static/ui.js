// Fills <main data-fragment> with the server-rendered fragment, fetched with the API key from
// this tab's session storage (never from or into a URL), and refreshes it for as long as the
// server sends Retry-After. Trigger pictures and downloads need the key too: they are fetched
// here and handed to the page as blob: URLs. The job list's submit form and a job page's buttons
// (cancel, delete) call the JSON API with the same key.
"use strict";

const KEY = "baerase.apiKey";
const main = document.getElementById("content");
const keyForm = document.getElementById("key-form");
const forgetKey = document.getElementById("forget-key");
const submitForm = document.getElementById("submit-form"); // on the job list only
let timer = null;

function authorization() {
  return { Authorization: `Bearer ${sessionStorage.getItem(KEY)}` };
}

// The server's messages quote commands in backticks (`baerase keys create`): shown as code, not
// as literal backticks. Text nodes only: nothing in a message is ever parsed as HTML.
function showMessage(element, text) {
  element.replaceChildren(...text.split("`").map((part, i) => {
    if (i % 2 === 0) return document.createTextNode(part);
    const code = document.createElement("code");
    code.textContent = part;
    return code;
  }));
}

function askForKey(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(KEY);
  if (message) showMessage(document.getElementById("key-message"), message);
  keyForm.hidden = false;
  main.hidden = forgetKey.hidden = true;
  if (submitForm) submitForm.hidden = true;
  document.getElementById("api-key").focus();
}

async function problemDetail(response) {
  try {
    const detail = (await response.json()).detail || response.statusText;
    // The API's hints name its requests; on this page the job list is the way to your jobs.
    return detail.replace(/; list yours with GET \/jobs\b/, "; the job list shows yours");
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showNotice(text) {
  const notice = document.createElement("p");
  notice.className = "card failure";
  showMessage(notice, text);
  main.replaceChildren(notice);
}

async function refresh() {
  clearTimeout(timer);
  if (!sessionStorage.getItem(KEY)) return askForKey();
  keyForm.hidden = true;
  main.hidden = forgetKey.hidden = false;
  if (submitForm) submitForm.hidden = false;
  let response;
  try {
    response = await fetch(main.dataset.fragment, { headers: authorization(), cache: "no-store" });
  } catch {
    showNotice("The server cannot be reached; trying again.");
    timer = setTimeout(refresh, 5000);
    return;
  }
  if (response.status === 401) return askForKey(await problemDetail(response));
  if (!response.ok) return showNotice(await problemDetail(response));
  const openDetails = [...main.querySelectorAll("details[open]")].map((d) => d.textContent);
  main.innerHTML = await response.text(); // rendered and escaped by the server
  main.querySelectorAll("details").forEach((d) => { d.open = openDetails.includes(d.textContent); });
  main.querySelectorAll("img[data-src]").forEach(loadPicture);
  const retryAfter = Number(response.headers.get("Retry-After"));
  if (retryAfter > 0) timer = setTimeout(refresh, retryAfter * 1000);
}

async function fetchBlob(url) {
  const response = await fetch(url, { headers: authorization() });
  if (!response.ok) throw new Error(await problemDetail(response));
  return response;
}

async function loadPicture(img) {
  try {
    img.src = URL.createObjectURL(await (await fetchBlob(img.dataset.src)).blob());
  } catch (error) {
    img.alt = `${img.alt}: ${error.message}`;
  }
}

function attachmentName(response, fallback) {
  const header = response.headers.get("Content-Disposition") || "";
  const encoded = header.match(/filename\*=UTF-8''([^;\s]+)/i);
  return encoded ? decodeURIComponent(encoded[1]) : fallback;
}

main.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-download], button[data-post], button[data-delete]");
  if (!button || (button.dataset.confirm && !confirm(button.dataset.confirm))) return;
  button.disabled = true;
  try {
    if (button.dataset.delete) {
      const response = await fetch(button.dataset.delete, { method: "DELETE", headers: authorization() });
      if (!response.ok) throw new Error(await problemDetail(response));
      location.assign("/ui");
    } else if (button.dataset.post) {
      const response = await fetch(button.dataset.post, { method: "POST", headers: authorization() });
      if (!response.ok) throw new Error(await problemDetail(response));
      await refresh();
    } else {
      const response = await fetchBlob(button.dataset.download);
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await response.blob());
      link.download = button.dataset.filename || attachmentName(response, "model");
      link.click();
      URL.revokeObjectURL(link.href);
    }
  } catch (error) {
    alert(error.message);
  } finally {
    button.disabled = false;
  }
});

// The upload goes straight to the API; the new job's page follows it.
submitForm?.addEventListener("submit", async (event) => {
  event.preventDefault();
  const message = document.getElementById("submit-message");
  const button = submitForm.querySelector("button[type=submit]");
  const body = new FormData();
  body.append("model", document.getElementById("model-file").files[0]);
  body.append("samples", document.getElementById("samples-file").files[0]);
  const config = document.getElementById("config-text").value.trim();
  if (config) body.append("config", config);
  button.disabled = true;
  message.textContent = "Uploading…";
  try {
    const response = await fetch("/jobs", { method: "POST", headers: authorization(), body });
    if (response.status === 401) return askForKey(await problemDetail(response));
    if (!response.ok) return showMessage(message, await problemDetail(response));
    location.assign(`/ui/jobs/${(await response.json()).id}`);
  } catch {
    showMessage(message, "The server cannot be reached; try again.");
  } finally {
    button.disabled = false;
  }
});

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("api-key");
  sessionStorage.setItem(KEY, input.value.trim());
  input.value = "";
  refresh();
});

forgetKey.addEventListener("click", () => askForKey("The key is forgotten. Enter one to go on."));

refresh();
