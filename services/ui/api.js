// The caller's token (kept for this browser tab only) and error messages from the APIs.

export function token() {
  return document.getElementById("token").value.trim();
}

export function authHeaders() {
  return token() ? { authorization: `Bearer ${token()}` } : {};
}

export async function errorText(response) {
  try {
    const body = await response.json();
    return `HTTP ${response.status}: ${body.error || body.detail || JSON.stringify(body)}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}
