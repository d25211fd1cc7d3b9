// One client for the whole app: every page shares its session and its single refresh.
const { createClient } = require('wxauth-miniprogram');

// Your wxauth server: add its HTTPS domain to the mini-program's request domain list
// (WeChat admin console). Its wechat.appid and wechat.secret must be this app's.
const BASE_URL = 'https://auth.example.com';

App({
  auth: createClient({ baseUrl: BASE_URL }),
});
