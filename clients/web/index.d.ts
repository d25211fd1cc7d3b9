/** The tokens a confirmed web login hands to the browser (once). */
export interface WebLoginTokens {
  access: string;
  refresh: string;
  access_expires_in: number;
  refresh_expires_in: number;
  user: { id: number };
}

export interface WebLoginCode {
  /** The ticket: the code's `scene`. */
  ticket: string;
  /** The mini-program code as a data: URL (`data:image/png;base64,...` or jpeg). */
  qr: string;
  /** Seconds until the code expires. */
  expiresIn: number;
}

export interface StartWebLoginOptions {
  /** Where wxauth is, e.g. `https://auth.example.com`; empty: this page's origin. */
  baseUrl?: string;
  /** Show the code (an `<img src=code.qr>`). */
  onCode?: (code: WebLoginCode) => void;
  /** The code was scanned: tell the user to confirm on the phone. */
  onScanned?: () => void;
  /** Cancels the login (it rejects with code `cancelled`). */
  signal?: AbortSignal;
  /** Seconds each long poll may wait (0–25, default 25). */
  wait?: number;
  /** A fetch to use instead of the global one. */
  fetch?: typeof fetch;
}

export declare class WebLoginError extends Error {
  /** `denied`, `expired`, `cancelled`, or the server's error code. */
  readonly code: string;
  readonly detail: string;
  /** HTTP status of an error answer; 0 otherwise. */
  readonly status: number;
}

export interface WebLogin extends Promise<WebLoginTokens> {
  /** Stops polling; the promise rejects with code `cancelled`. */
  cancel(): void;
}

export declare function startWebLogin(options?: StartWebLoginOptions): WebLogin;
