// Types for wxauth-miniprogram, written against miniprogram-api-typings (the
// `WechatMiniprogram` namespace that WeChat's TypeScript template installs).
/// <reference types="miniprogram-api-typings" />

/** The part of `wx` the client uses. Pass your own only outside a mini-program (tests). */
export type WxLike = Pick<WechatMiniprogram.Wx, 'login' | 'request' | 'getStorageSync' | 'setStorageSync'>;

export interface ClientOptions {
  /** The wxauth server, e.g. `https://auth.example.com` (in the mini-program's request domain list). */
  baseUrl: string;
  /** Prefix of the one storage key the session is kept under (`<prefix>session`). Default `wxauth.`. */
  storageKeyPrefix?: string;
  /** Sent with the login code, to pick one of several mini-programs the server serves. */
  appid?: string;
  /**
   * Refresh the access token before a request when less than this many seconds of it are
   * left (at most a fifth of its lifetime). Default 30.
   */
  refreshAheadSeconds?: number;
  /** The `wx` object. Default: the mini-program's global `wx`. */
  wx?: WxLike;
}

/** What `login()` resolves with: the server's `user` of the login answer. */
export interface LoginUser {
  id: number;
  /** true when this login created the user. */
  created: boolean;
}

/** What `user()` resolves with: `GET /api/weixin/data/`'s `user`. */
export interface User {
  id: number;
  openid: string;
  /** RFC 3339 */
  created_at: string;
  /** RFC 3339 */
  last_login_at: string;
  [field: string]: unknown;
}

/** What the web login calls resolve with. */
export interface WebLoginAnswer {
  status: 'scanned' | 'confirmed' | 'denied';
}

/** What `phone(code)` resolves with: the answer of `POST /api/weixin/phone/`. */
export interface PhoneAnswer {
  phone_number?: string;
  pure_phone_number?: string;
  country_code?: string;
  [field: string]: unknown;
}

type RequestData = string | WechatMiniprogram.IAnyObject | ArrayBuffer;

/** `wx.request`'s options without the callbacks; `url` may be a path on `baseUrl`. */
export type RequestOptions<T extends RequestData = any> = Omit<
  WechatMiniprogram.RequestOption<T>,
  'success' | 'fail' | 'complete'
>;

export interface Client {
  /** wx.login(), then the server's login; stores the tokens. One in flight at a time. */
  login(): Promise<LoginUser>;
  /**
   * wx.request with `Authorization: Bearer <access>`. Logs in first when there is no
   * session; refreshes first when the access token is nearly spent. On a 401: one refresh
   * (single flight; wx.login again if the refresh is refused), then one retry, never more.
   * Resolves with wx.request's result for a 2xx answer; rejects with a WxAuthError otherwise.
   */
  request<T extends RequestData = any>(
    options: RequestOptions<T>
  ): Promise<WechatMiniprogram.RequestSuccessCallbackResult<T>>;
  /** Revokes this login on the server (`/api/token/blacklist/`) and clears storage. */
  logout(): Promise<void>;
  /** The signed-in user (`GET /api/weixin/data/`). */
  user(): Promise<User>;
  /** Sends a `getPhoneNumber` code to `POST /api/weixin/phone/`. */
  phone(code: string): Promise<PhoneAnswer>;
  /**
   * Web login: the code's `scene` (the page's `options.scene`) was scanned; the
   * browser shows "confirm on your phone". Resolves with `{status: "scanned"}`.
   */
  scanWebLogin(scene: string): Promise<WebLoginAnswer>;
  /** Logs the browser in as this user (a new session of its own). */
  confirmWebLogin(scene: string): Promise<WebLoginAnswer>;
  /** Refuses the browser's login. */
  denyWebLogin(scene: string): Promise<WebLoginAnswer>;
}

/**
 * Every rejection: the server's `{code, detail}` and the HTTP `status`; status 0 when
 * there was no answer (`network_error`, `wx_login_failed`, `logged_out`).
 */
export declare class WxAuthError extends Error {
  readonly name: 'WxAuthError';
  /** HTTP status; 0 when the server did not answer. */
  readonly status: number;
  /** The contract's snake_case code, e.g. `token_not_valid`, `code_invalid`. */
  readonly code: string;
  /** The contract's English sentence. */
  readonly detail: string;
  /** The whole answer body, when there was one. */
  readonly data?: unknown;
}

export declare function createClient(options: ClientOptions): Client;
