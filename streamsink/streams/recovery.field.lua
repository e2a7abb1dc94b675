-- XINFO's flat replies: the value after `name`. Shared by both scripts.
local function field(list, name)
  for i = 1, #list, 2 do
    if list[i] == name then return list[i + 1] end
  end
  return nil
end
